"""OpenCLIP's ViT-B/32 on LAION-400M (the `laion400m_e32` weights): CLIP's recipe on open data.

Follows the run of OpenCLIP's docs/PRETRAINED.md ("ViT-B/32 224x224", 62.96 % ImageNet zero-shot)
and the SLURM example of its README, which are Radford et al. 2021's ViT hyperparameters
(open_clip issue #100: "the exact hyperparameters listed in the CLIP paper"):

- global batch 32,768 (128 A100-40GB x 256), 32 epochs of LAION-400M, counted as Cherti et al.
  2023 count it (LAION-AI/scaling-laws-openclip trained_models_info.csv: 407,332,084 samples per
  epoch), so 32 x 407,332,084 = 13,034,626,688 examples seen, and
  total_steps = 13,034,626,688 // 32,768 = 397,785;
- AdamW, learning rate 5e-4 (open_clip_train/params.py's default for ViTs), betas (0.9, 0.98),
  eps 1e-6, weight decay 0.2 (decoupled and scaled by the learning rate, as PyTorch's AdamW);
  2,000 warm-up steps, then cosine to 0; no gradient clipping (OpenCLIP's default);
- 224 px images, OpenCLIP's training transform RandomResizedCrop(224, scale=(0.9, 1.0)) then
  OpenAI's mean and std (here `inception_crop(224, 0.9, 1.0)|clip_normalize`: bilinear where
  OpenCLIP's crop is bicubic); no flips;
- OpenAI's BPE tokenizer, 77 tokens; the softmax contrastive loss over the global batch (exactly
  what OpenCLIP's --local-loss --gather-with-grad computes), temperature clamped at 100.

Weight decay here skips biases, norms, the scale and the position / class embeddings (OpenCLIP
also skips the class embedding but decays the position embedding).

Needs: LAION-400M as WebDataset shards (img2dataset, about 10 TB at 256 px; each process reads every
process_count-th shard), ImageNet prepared in tfds (`imagenet2012`, manual download) and
`coco_captions` for the evaluations. Devices: OpenCLIP used 128 A100-40GB for about 36 hours
(4,600 GPU-hours). Memory per device, estimated from the compiled memory of this train step as
XLA's CPU compiler lays it out (jclip has no memory planner yet; a GPU's layout differs): 1.7 GiB of
parameters and AdamW state plus about 100 MiB per example in float32 (85 MiB with
model.dtype="bfloat16"), so 256 per device on 128 devices takes ~27 GiB, as OpenCLIP's 40 GB A100s
held. With fewer devices raise --config.micro_batches (gradient caching: the same
global-batch gradient with one micro-batch's activations), e.g. 8 x 80 GB GPUs (4,096 per device):
--config.micro_batches=8 (512 at a time, ~52 GiB).

    python -m jclip.train --config configs/open_clip_vit_b32_laion400m.py --workdir runs/b32_laion400m \
        --config.data.sources.laion.pattern='/data/laion400m/*.tar' \
        --config.data.data_dir=/data/tensorflow_datasets

(on several hosts add --multihost, see README "Launch on a cluster"). Drop the evaluations with
--config.evaluate.tasks={} or evaluate later with `python -m jclip.evaluate`.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from jclip.models import model_config

EXAMPLES_PER_EPOCH = 407_332_084  # LAION-400M as Cherti et al. 2023 count it; your download may have fewer
EPOCHS = 32
BATCH_SIZE = 32_768
TOTAL_STEPS = EPOCHS * EXAMPLES_PER_EPOCH // BATCH_SIZE  # 397,785
PREPROCESS = "decode|inception_crop(224, 0.9, 1.0)|clip_normalize"  # OpenCLIP's train transform


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.data_dir = placeholder(str)  # tfds data dir (the evaluation datasets)
    config.data.sources = ml_collections.ConfigDict()
    config.data.sources.laion = dict(kind="tar", pattern="/data/laion400m/*.tar", weight=1.0)  # override pattern
    config.data.tokenizer = "clip"  # OpenAI's BPE, OpenCLIP's exact ids
    config.data.image_size = 224
    config.data.preprocess = PREPROCESS  # no flips: captions say "left" and "right"
    config.data.text_length = 77
    config.data.shuffle_buffer = 50_000
    config.data.negative_kinds = ()
    config.data.negative_attributes = ()

    config.model_name = "ViT-B-32"
    config.model = model_config(config.model_name)
    config.losses = ml_collections.ConfigDict()
    config.losses.clip = dict(weight=1.0)
    config.teacher = placeholder(str)
    # Pretrained weights a new run starts from (jclip.train.init_from): a run, a checkpoint or a weight file
    # (with its model), and the parameter groups to take (e.g. ("image_tower",), or ("all",)).
    config.init_from = ml_collections.ConfigDict()
    config.init_from.path = placeholder(str)
    config.init_from.model = placeholder(str)
    config.init_from.parts = ("all",)

    config.batch_size = BATCH_SIZE
    config.micro_batches = 1  # >1: gradient caching where the per-device batch does not fit
    config.parameter_sharding = "replicated"
    config.ema_decay = 0.0
    config.total_steps = TOTAL_STEPS
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"
    config.optimizer.schedule = "cosine"
    config.optimizer.learning_rate = 5e-4
    config.optimizer.end_learning_rate = 0.0
    config.optimizer.warmup_steps = 2_000
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
    config.checkpoint_every = 5_000  # about half an hour on 128 A100s
    config.checkpoint_every_minutes = 30.0
    config.keep_checkpoints = 2
    config.keep_checkpoint_every = 50_000
    config.checkpoint_failure = "stop"  # a save that fails (a full disk) stops the run; "retry": at the next save
    config.resume_strict = False  # True: stop at an unreadable checkpoint instead of resuming from the one before
    config.lock_stale_minutes = 10.0  # a workdir lock not refreshed for this long is a dead trainer's

    config.evaluate = ml_collections.ConfigDict()
    config.evaluate.batch_size = 1024
    config.evaluate.every_steps = 12_000  # about once per epoch (12,430 steps), as OpenCLIP's zero-shot evaluation
    config.evaluate.preprocess = placeholder(str)  # None: resize the shorter side, centre-crop, clip_normalize
    config.evaluate.shapes_config = "default"  # unused: no `shapes` task here
    config.evaluate.tasks = ml_collections.ConfigDict()
    config.evaluate.tasks.imagenet = dict(kind="zero_shot", dataset="imagenet2012", split="validation",
                                          class_names="imagenet", templates="openai_imagenet")
    config.evaluate.tasks.coco = dict(kind="retrieval", source=dict(kind="tfds", name="coco_captions", split="test",
                                                                    caption_key="captions/text"))
    return config
