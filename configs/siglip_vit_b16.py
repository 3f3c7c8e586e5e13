"""SigLIP ViT-B/16 (Zhai et al. 2023, arXiv 2303.15343): the pairwise sigmoid loss at batch 32k.

Follows the paper's SigLIP-from-scratch setting with big_vision's conventions (the WebLI training
configs are not public; checked: big_vision's configs/proj/image_text/siglip_lit_coco.py, optax.py,
SigLIP_demo.ipynb, and OpenCLIP's ViT-B-16-SigLIP.json):

- the sigmoid loss with a learnable scale and bias initialised to t = 10 and b = -10 (the
  `ViT-B-16-SigLIP` model sets init_scale=10, init_bias=-10, no scale clamp), computed with the
  ring of ppermutes (memory per device linear in the global batch);
- global batch 32,768 (the paper: "32k being sufficient"), 9B examples seen (the paper's SigLIP
  batch-size study), so total_steps = 9,000,000,000 // 32,768 = 274,658;
- Adam with beta2 = 0.95 (the paper's fix for large-batch instability), eps 1e-8 (optax's
  scale_by_adam), learning rate 1e-3, weight decay 1e-4 in big_vision's units (added to the update
  and multiplied by the schedule but not by the learning rate), which is 1e-4 / 1e-3 = 0.1 in
  jclip's (decay scaled by the learning rate), big_vision's kernels-only decay approximated by
  jclip's matrices-only decay; big_vision's warm-up rule max(3 % of the steps, 100) = 8,239 steps,
  then cosine to 0; gradients clipped at global norm 1.0;
- images resized to 224 x 224 and scaled to [-1, 1] (big_vision's `resize(224)|value_range(-1, 1)`,
  no augmentation); T5's English SentencePiece vocabulary (32,000 pieces, big_vision's "c4_en",
  gs://t5-data/vocabs/cc_en.32000/sentencepiece.model), 64 tokens as the released B/16 checkpoints
  (the paper's ablations used 16: --config.data.text_length=16).

The numbers taken from the paper's text alone (9B examples, learning rate 1e-3, weight decay 1e-4,
beta2 0.95) were not checked against a copy of it when this file was written; the rest were checked
in the sources named above.

Not reproduced: WebLI (not public; any WebDataset shards, e.g. LAION or DataComp, take its place)
and big_vision's padding with the end id 1: jclip's "sentencepiece:PATH" tokenizer pads with the
model's pad piece (0), so rows read by the last-token pooling of short captions end in pad 0, not
1 (it trains the same from scratch, but fine-tuning converted big_vision weights sees other ids).
The trainer's evaluations squash the images to 224 x 224 as training does (and as big_vision's
evaluations do), then scale them to [-1, 1].

Needs: image–text WebDataset shards (--config.data.sources.web.pattern), the SentencePiece model
file (--config.data.tokenizer=sentencepiece:PATH), ImageNet and coco_captions in tfds for the
evaluations. Devices: the released B/16 was trained on 16 TPU-v4 chips for three days (Hugging
Face's model card of google/siglip-base-patch16-224), 2,048 examples per chip. Memory per device,
estimated from the compiled memory of this train step as XLA's CPU compiler lays it out (jclip has
no memory planner yet; a GPU's layout differs): 2.3 GiB of parameters and Adam state plus about
300 MiB per example in float32 (230 MiB with model.dtype="bfloat16"); the ring's similarity blocks
add only [per-device batch]^2 floats. So e.g. 64 x 80 GB GPUs (512 per device) with
--config.micro_batches=4 (gradient caching: the same gradient, 128 examples' activations at a time,
~40 GiB).

    python -m jclip.train --config configs/siglip_vit_b16.py --workdir runs/siglip_b16 \
        --config.data.sources.web.pattern='/data/webdataset/*.tar' \
        --config.data.tokenizer=sentencepiece:/data/vocabs/cc_en.32000/sentencepiece.model \
        --config.data.data_dir=/data/tensorflow_datasets --config.micro_batches=4

A model swapped in with --config.model_name needs a learnable bias for this loss:
--config.model.init_bias=-10.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from jclip.models import model_config

EXAMPLES_SEEN = 9_000_000_000
BATCH_SIZE = 32_768
TOTAL_STEPS = EXAMPLES_SEEN // BATCH_SIZE  # 274,658
WARMUP_STEPS = max(int(0.03 * TOTAL_STEPS), 100)  # big_vision's rule: 8,239
LEARNING_RATE = 1e-3
BIG_VISION_WEIGHT_DECAY = 1e-4  # not scaled by the learning rate; jclip's is
PREPROCESS = "decode|resize(224)|value_range(-1, 1)"  # big_vision's SigLIP preprocessing


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.data_dir = placeholder(str)  # tfds data dir (the evaluation datasets)
    config.data.sources = ml_collections.ConfigDict()
    config.data.sources.web = dict(kind="tar", pattern="/data/webdataset/*.tar", weight=1.0)  # override pattern
    # T5's English SentencePiece model (big_vision's "c4_en"); download it and give its path.
    config.data.tokenizer = "sentencepiece:/data/vocabs/cc_en.32000/sentencepiece.model"
    config.data.image_size = 224
    config.data.preprocess = PREPROCESS
    config.data.text_length = 64
    config.data.shuffle_buffer = 50_000
    config.data.negative_kinds = ()
    config.data.negative_attributes = ()

    config.model_name = "ViT-B-16-SigLIP"  # init_scale=10, init_bias=-10, no scale clamp
    config.model = model_config(config.model_name)
    config.losses = ml_collections.ConfigDict()
    config.losses.siglip = dict(weight=1.0, ring=True)
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
    config.optimizer.learning_rate = LEARNING_RATE
    config.optimizer.end_learning_rate = 0.0
    config.optimizer.warmup_steps = WARMUP_STEPS
    config.optimizer.weight_decay = BIG_VISION_WEIGHT_DECAY / LEARNING_RATE  # 0.1
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.95
    config.optimizer.eps = 1e-8
    config.optimizer.grad_clip_norm = 1.0
    config.optimizer.frozen = ()
    config.optimizer.lr_multipliers = {}
    config.optimizer.layer_decay = placeholder(float)  # e.g. 0.75: layer-wise rate decay in each tower; None: off
    config.optimizer.skip_nonfinite = False

    config.log_every = 100
    config.tensorboard = True
    config.peak_flops_per_device = placeholder(float)
    config.profile_steps = placeholder(str)
    config.checkpoint_every = 5_000
    config.checkpoint_every_minutes = 30.0
    config.keep_checkpoints = 2
    config.keep_checkpoint_every = 50_000
    config.checkpoint_failure = "stop"  # a save that fails (a full disk) stops the run; "retry": at the next save
    config.resume_strict = False  # True: stop at an unreadable checkpoint instead of resuming from the one before
    config.lock_stale_minutes = 10.0  # a workdir lock not refreshed for this long is a dead trainer's

    config.evaluate = ml_collections.ConfigDict()
    config.evaluate.batch_size = 1024
    config.evaluate.every_steps = 10_000
    config.evaluate.preprocess = placeholder(str)  # None: resize(224)|value_range(-1, 1), as it trains
    config.evaluate.shapes_config = "default"  # unused: no `shapes` task here
    config.evaluate.tasks = ml_collections.ConfigDict()
    config.evaluate.tasks.imagenet = dict(kind="zero_shot", dataset="imagenet2012", split="validation",
                                          class_names="imagenet", templates="openai_imagenet")
    config.evaluate.tasks.coco = dict(kind="retrieval", source=dict(kind="tfds", name="coco_captions", split="test",
                                                                    caption_key="captions/text"))
    return config
