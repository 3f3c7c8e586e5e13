"""Fine-tuning converted OpenCLIP ViT-B/32 weights on your own image–caption CSV.

Follows the end-to-end fine-tuning of WiSE-FT (Wortsman et al. 2022, arXiv 2109.01903; checked:
github.com/mlfoundations/wise-ft README "ViT-B/32" command, src/args.py, src/models/finetune.py,
clip/clip.py), applied to the contrastive loss on your captions instead of WiSE-FT's cross-entropy
on ImageNet classes (the contrastive variant is FLYP's, Goyal et al. 2022):

- AdamW with PyTorch's defaults (betas (0.9, 0.999), eps 1e-8), learning rate 3e-5, weight decay
  0.1 (decoupled, scaled by the learning rate as PyTorch's), 500 warm-up steps, cosine to 0,
  gradients clipped at global norm 1.0;
- batch 512, 10 epochs: total_steps = 10 x EXAMPLES // 512. The default, 10 x 1,281,167 // 512 =
  25,022, is WiSE-FT's (ImageNet's 1,281,167 training images); for your data set
  --config.total_steps to 10 x (usable rows) // 512, e.g. 100,000 pairs: 1,953 steps (and, for
  runs shorter than about 2,000 steps, fewer warm-up steps, e.g. --config.optimizer.warmup_steps=100);
- WiSE-FT's training transform, CLIP's RandomResizedCrop(224, scale=(0.9, 1.0)) then OpenAI's mean
  and std (`inception_crop(224, 0.9, 1.0)|clip_normalize`, bilinear where theirs is bicubic), no
  flips; OpenAI's BPE with 77 tokens.

WiSE-FT decays every parameter; jclip skips biases, norms, the scale and position / class
embeddings. WiSE-FT's weight-space ensembling of the zero-shot and fine-tuned weights is the step
after training: `python -m jclip.wise_ft --pretrained WEIGHTS_CHECKPOINT --finetuned runs/finetune_b32 ...`.

Starting weights: `config.init_from` (both towers and the scale) with a fresh optimizer: an OpenCLIP
weight file of `init_from.model` (converted as the run starts), or a checkpoint written by
`python -m jclip.convert` or trained by jclip. Without it the run trains from random weights, which
25k steps at this learning rate cannot do well.

Needs: the pretrained weights, a CSV / TSV (by extension) of image paths (relative to the file)
and captions (columns `filepath` and `title`, or --config.data.sources.mine.image_column=... and
caption_column=...), and ImageNet in tfds for the zero-shot evaluation, which shows what fine-tuning
costs in generality (or --config.evaluate.tasks={}). Devices: one is enough. Memory, estimated
from the compiled memory of this train step as XLA's CPU compiler lays it out (jclip has no memory
planner yet; a GPU's layout differs): 1.7 GiB of parameters and AdamW state plus about 100 MiB per
example in float32 (85 MiB with model.dtype="bfloat16"): 512 per step fits one 80 GB GPU (~52 GiB); on a 40 GB GPU add --config.micro_batches=2, on a 24 GB one --config.micro_batches=4
(gradient caching: the same gradient, 256 or 128 examples' activations at a time).

    python -m jclip.train --config configs/finetune_vit_b32.py --workdir runs/finetune_b32 \
        --config.init_from.path=open_clip_model.safetensors \
        --config.data.sources.mine.path=/data/pairs.tsv --config.total_steps=1953 \
        --config.data.data_dir=/data/tensorflow_datasets
"""

import ml_collections
from ml_collections.config_dict import placeholder

from jclip.models import model_config

EXAMPLES = 1_281_167  # WiSE-FT's data (ImageNet-1k train); set total_steps for yours
EPOCHS = 10
BATCH_SIZE = 512
TOTAL_STEPS = EPOCHS * EXAMPLES // BATCH_SIZE  # 25,022
PREPROCESS = "decode|inception_crop(224, 0.9, 1.0)|clip_normalize"  # CLIP's / OpenCLIP's train transform


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.data_dir = placeholder(str)  # tfds data dir (the evaluation datasets)
    config.data.sources = ml_collections.ConfigDict()
    config.data.sources.mine = dict(kind="csv", path="/data/pairs.tsv", image_column="filepath",
                                    caption_column="title", weight=1.0)  # override path (and columns)
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
    # (with its model), and the parameter groups to take (all of them: the whole model is fine-tuned).
    config.init_from = ml_collections.ConfigDict()
    config.init_from.path = placeholder(str)
    config.init_from.model = "ViT-B-32"
    config.init_from.parts = ("all",)

    config.batch_size = BATCH_SIZE
    config.micro_batches = 1  # >1: gradient caching where 512 does not fit
    config.parameter_sharding = "replicated"
    config.ema_decay = 0.0
    config.total_steps = TOTAL_STEPS
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"
    config.optimizer.schedule = "cosine"
    config.optimizer.learning_rate = 3e-5
    config.optimizer.end_learning_rate = 0.0
    config.optimizer.warmup_steps = 500
    config.optimizer.weight_decay = 0.1
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.grad_clip_norm = 1.0
    config.optimizer.frozen = ()
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
    config.evaluate.every_steps = 2_500  # about once per ImageNet-sized epoch (2,502 steps)
    config.evaluate.preprocess = placeholder(str)  # None: resize the shorter side, centre-crop, clip_normalize
    config.evaluate.shapes_config = "default"  # unused: no `shapes` task here
    config.evaluate.tasks = ml_collections.ConfigDict()
    config.evaluate.tasks.imagenet = dict(kind="zero_shot", dataset="imagenet2012", split="validation",
                                          class_names="imagenet", templates="openai_imagenet")
    return config
