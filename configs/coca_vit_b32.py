"""CoCa ViT-B/32 (Yu et al. 2022, arXiv 2205.01917) as OpenCLIP trains coca_ViT-B-32.

Follows OpenCLIP's published CoCa: the `coca_ViT-B-32` model config, OpenCLIP's CoCa loss with its
training script's default weights (open_clip_train/params.py: --coca-contrastive-loss-weight 1,
--coca-caption-loss-weight 2), and the run its released weights name, `laion2b_s13b_b90k`
(src/open_clip/pretrained.py): LAION-2B, 13B examples seen, a global batch of about 90k:

- loss = 1 x contrastive (softmax over the global batch) + 2 x captioning (next-token
  cross-entropy of the multimodal decoder, padding ignored);
- global batch 90,112 (90k rounded to a multiple of 1,024; the exact value is not published),
  13B examples, so total_steps = 13,000,000,000 // 90,112 = 144,264;
- OpenCLIP's training defaults, since the run's own hyperparameters are not published: AdamW,
  learning rate 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2, 10,000 warm-up steps, cosine
  to 0, no gradient clipping;
- OpenCLIP's training transform RandomResizedCrop(224, scale=(0.9, 1.0)) then OpenAI's mean and
  std (`inception_crop(224, 0.9, 1.0)|clip_normalize`, bilinear where OpenCLIP's is bicubic); no
  flips; OpenAI's BPE with 76 tokens, the text tower's context, as OpenCLIP's get_tokenizer gives
  for this model (the caption loss predicts tokens 2 to 76 from the ones before them, as OpenCLIP's
  CoCaTask does).

Needs: LAION-2B (or other) image–text WebDataset shards, ImageNet and coco_captions in tfds for the
evaluations. Devices: many; the caption head is the memory hog (76 x 49,408 logits per example).
Memory per device, estimated from the compiled memory of this train step as XLA's CPU compiler lays
it out (jclip has no memory planner yet; a GPU's layout differs): 2.9 GiB of parameters and AdamW
state plus about 290 MiB per example in float32 (215 MiB with model.dtype="bfloat16"), so e.g.
352 x 80 GB GPUs (256 per device) with --config.micro_batches=2 (gradient caching: 128
examples' activations at a time, plus the caption logits of all 256 kept, 15 MiB each: ~45 GiB).

    python -m jclip.train --config configs/coca_vit_b32.py --workdir runs/coca_b32 \
        --config.data.sources.laion.pattern='/data/laion2b/*.tar' \
        --config.data.data_dir=/data/tensorflow_datasets --config.micro_batches=2

After training, `jclip.models.generate` writes captions (README "Models and converted weights").
"""

import ml_collections
from ml_collections.config_dict import placeholder

from jclip.models import model_config

EXAMPLES_SEEN = 13_000_000_000  # "s13b"
BATCH_SIZE = 90_112  # "b90k"
TOTAL_STEPS = EXAMPLES_SEEN // BATCH_SIZE  # 144,264
PREPROCESS = "decode|inception_crop(224, 0.9, 1.0)|clip_normalize"  # OpenCLIP's train transform


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.data_dir = placeholder(str)  # tfds data dir (the evaluation datasets)
    config.data.sources = ml_collections.ConfigDict()
    config.data.sources.laion = dict(kind="tar", pattern="/data/laion2b/*.tar", weight=1.0)  # override pattern
    config.data.tokenizer = "clip"  # OpenAI's BPE, OpenCLIP's exact ids (padding 0, ignored by the caption loss)
    config.data.image_size = 224
    config.data.preprocess = PREPROCESS  # no flips: captions say "left" and "right"
    config.data.text_length = 76  # coca_ViT-B-32's text context
    config.data.shuffle_buffer = 50_000
    config.data.negative_kinds = ()
    config.data.negative_attributes = ()

    config.model_name = "coca_ViT-B-32"
    config.model = model_config(config.model_name)
    config.losses = ml_collections.ConfigDict()
    config.losses.clip = dict(weight=1.0)
    config.losses.caption = dict(weight=2.0)
    config.teacher = placeholder(str)
    # Pretrained weights a new run starts from (jclip.train.init_from): a run, a checkpoint or a weight file
    # (with its model), and the parameter groups to take (e.g. ("image_tower",), or ("all",)).
    config.init_from = ml_collections.ConfigDict()
    config.init_from.path = placeholder(str)
    config.init_from.model = placeholder(str)
    config.init_from.parts = ("all",)

    config.batch_size = BATCH_SIZE
    config.micro_batches = 1
    config.parameter_sharding = "replicated"
    config.ema_decay = 0.0
    config.total_steps = TOTAL_STEPS
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"
    config.optimizer.schedule = "cosine"
    config.optimizer.learning_rate = 5e-4
    config.optimizer.end_learning_rate = 0.0
    config.optimizer.warmup_steps = 10_000
    config.optimizer.weight_decay = 0.2
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.98
    config.optimizer.eps = 1e-6
    config.optimizer.grad_clip_norm = float("inf")  # OpenCLIP clips no gradients by default
    config.optimizer.frozen = ()
    config.optimizer.lr_multipliers = {}
    config.optimizer.layer_decay = placeholder(float)  # e.g. 0.75: layer-wise rate decay in each tower; None: off
    config.optimizer.skip_nonfinite = False

    config.log_every = 100
    config.tensorboard = True
    config.peak_flops_per_device = placeholder(float)
    config.profile_steps = placeholder(str)
    config.checkpoint_every = 2_500
    config.checkpoint_every_minutes = 30.0
    config.keep_checkpoints = 2
    config.keep_checkpoint_every = 25_000
    config.checkpoint_failure = "stop"  # a save that fails (a full disk) stops the run; "retry": at the next save
    config.resume_strict = False  # True: stop at an unreadable checkpoint instead of resuming from the one before
    config.lock_stale_minutes = 10.0  # a workdir lock not refreshed for this long is a dead trainer's

    config.evaluate = ml_collections.ConfigDict()
    config.evaluate.batch_size = 1024
    config.evaluate.every_steps = 10_000
    config.evaluate.preprocess = placeholder(str)  # None: resize the shorter side, centre-crop, clip_normalize
    config.evaluate.shapes_config = "default"  # unused: no `shapes` task here
    config.evaluate.tasks = ml_collections.ConfigDict()
    config.evaluate.tasks.imagenet = dict(kind="zero_shot", dataset="imagenet2012", split="validation",
                                          class_names="imagenet", templates="openai_imagenet")
    config.evaluate.tasks.coco = dict(kind="retrieval", source=dict(kind="tfds", name="coco_captions", split="test",
                                                                    caption_key="captions/text"))
    return config
