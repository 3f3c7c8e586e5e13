"""LiT (Zhai et al. 2022, arXiv 2111.07991): a locked image tower, the text tower trained to match it.

Follows big_vision's LiT demonstration config (configs/proj/image_text/lit_coco.py at commit 430df79,
the config its LiT README reproduces on public data), with a CLIP ViT-B/32 as the locked tower:

- data: tfds `coco_captions` (train split, one of its five captions per visit), batch 4,096,
  5,000 steps (20,480,000 examples, about 250 epochs of COCO's 82,783 training images);
- the image tower frozen (`optimizer.frozen=("image_tower",)`), everything else trained;
- Adam (big_vision's scale_by_adam: betas (0.9, 0.999), eps 1e-8), learning rate 1e-3, warm-up
  max(3 % of the steps, 100) = 150 steps, then cosine to 0, gradients clipped at global norm 1.0;
  weight decay 0.01 in big_vision's units (added to the update and multiplied by the schedule but
  not by the learning rate), which is 0.01 / 1e-3 = 10.0 in jclip's (decay scaled by the learning
  rate, so the same 0.01 x schedule per step);
- the softmax contrastive loss (big_vision's LiT trainer), 224 px images.

Departures: big_vision's LiT locks an AugReg ViT-B/16 classifier and trains a BERT text tower on
16 tokens; here both towers are CLIP ViT-B/32's (OpenAI's tokenizer, 77 tokens). Its training
augmentation (resize, flip_lr, RandAugment(2, 10), values in [-1, 1]) is replaced by OpenCLIP's
RandomResizedCrop(224, scale 0.9-1.0) equivalent with OpenAI's normalisation, which the locked
CLIP tower was trained with; jclip has no RandAugment, and flips are off because captions say "left"
and "right".

Starting weights: `config.init_from` takes the image tower of OpenCLIP ViT-B/32 weights (a weight file,
converted as the run starts, or a checkpoint written by `python -m jclip.convert`); the text tower,
projections' partners and scale start from a fresh initialisation, as in LiT's "Lu" setup (locked
pretrained image tower, text tower trained from scratch). Give ("all",) as init_from.parts for the
"LU" setup (pretrained text tower, unlocked).

Needs: OpenCLIP ViT-B/32 weights (above), `coco_captions` prepared in tfds (and ImageNet
for the zero-shot evaluation). Devices: any; the locked tower keeps no optimizer state but its
gradients are still computed (they do not count in the clipping norm). Memory per device, estimated from
the compiled memory of this train step as XLA's CPU compiler lays it out (jclip has no memory
planner yet; a GPU's layout differs): 1.0 GiB of parameters and AdamW state plus about 100 MiB per
example in float32 (85 MiB with model.dtype="bfloat16"): e.g. 8 x 80 GB GPUs, 512 per device
(~52 GiB), or 8 x 40 GB with --config.micro_batches=2.

    python -m jclip.train --config configs/lit_vit_b32.py --workdir runs/lit_b32 \
        --config.init_from.path=open_clip_model.safetensors --config.data.data_dir=/data/tensorflow_datasets

Other image–text data: --config.data.sources='{"web": {"kind": "tar", "pattern": "/data/shards/*.tar"}}'.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from jclip.models import model_config

BATCH_SIZE = 4_096
TOTAL_STEPS = 5_000  # 20,480,000 examples
WARMUP_STEPS = max(int(0.03 * TOTAL_STEPS), 100)  # big_vision's rule: 150
LEARNING_RATE = 1e-3
BIG_VISION_WEIGHT_DECAY = 0.01  # not scaled by the learning rate; jclip's is
PREPROCESS = "decode|inception_crop(224, 0.9, 1.0)|clip_normalize"  # OpenCLIP's train transform


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.data_dir = placeholder(str)  # tfds data dir: coco_captions (and the evaluation datasets)
    config.data.sources = ml_collections.ConfigDict()
    config.data.sources.coco = dict(kind="tfds", name="coco_captions", split="train", caption_key="captions/text",
                                    weight=1.0)
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
    # (with its model), and the parameter groups to take (LiT: the image tower only, locked below; the text tower starts afresh).
    config.init_from = ml_collections.ConfigDict()
    config.init_from.path = placeholder(str)
    config.init_from.model = "ViT-B-32"
    config.init_from.parts = ("image_tower",)

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
    config.optimizer.weight_decay = BIG_VISION_WEIGHT_DECAY / LEARNING_RATE  # 10.0
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.grad_clip_norm = 1.0
    config.optimizer.frozen = ("image_tower",)  # the "Lock" of LiT
    config.optimizer.lr_multipliers = {}
    config.optimizer.layer_decay = placeholder(float)  # e.g. 0.75: layer-wise rate decay in each tower; None: off
    config.optimizer.skip_nonfinite = False

    config.log_every = 50
    config.tensorboard = True
    config.peak_flops_per_device = placeholder(float)
    config.profile_steps = placeholder(str)
    config.checkpoint_every = 1_000
    config.checkpoint_every_minutes = 30.0
    config.keep_checkpoints = 2
    config.keep_checkpoint_every = placeholder(int)
    config.checkpoint_failure = "stop"  # a save that fails (a full disk) stops the run; "retry": at the next save
    config.resume_strict = False  # True: stop at an unreadable checkpoint instead of resuming from the one before
    config.lock_stale_minutes = 10.0  # a workdir lock not refreshed for this long is a dead trainer's

    config.evaluate = ml_collections.ConfigDict()
    config.evaluate.batch_size = 1024
    config.evaluate.every_steps = 1_000  # big_vision evaluates COCO retrieval every 1,000 steps
    config.evaluate.preprocess = placeholder(str)  # None: resize the shorter side, centre-crop, clip_normalize
    config.evaluate.shapes_config = "default"  # unused: no `shapes` task here
    config.evaluate.tasks = ml_collections.ConfigDict()
    config.evaluate.tasks.coco = dict(kind="retrieval", source=dict(kind="tfds", name="coco_captions", split="test",
                                                                    caption_key="captions/text"))
    config.evaluate.tasks.imagenet = dict(kind="zero_shot", dataset="imagenet2012", split="validation",
                                          class_names="imagenet", templates="openai_imagenet")
    return config
