"""The demo recipe: a small CLIP trained on the built-in `shapes` dataset in a few minutes on a CPU.

    python -m jclip.train --config configs/shapes_tiny.py --workdir runs/shapes_tiny
"""

import ml_collections
from ml_collections.config_dict import placeholder

from jclip.models import model_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.data_dir = placeholder(str)  # tfds data dir; default: $JCLIP_DATA_DIR or ~/.cache/jclip/datasets
    config.data.sources = ml_collections.ConfigDict()
    config.data.sources.shapes = dict(kind="shapes", config="default", weight=1.0)
    config.data.tokenizer = "shapes/default"  # the BPE trained on the shapes captions
    config.data.image_size = 64
    config.data.preprocess = "decode|value_range(-1, 1)"  # no flips: captions say "left of"
    config.data.text_length = 16
    config.data.shuffle_buffer = 50_000
    # NegCLIP-style hard-negative captions carried in the batch as `negative_tokens` (none by default),
    # e.g. kinds=("swap_attributes",), attributes=(colours, sizes) from jclip.data.shapes.
    config.data.negative_kinds = ()
    config.data.negative_attributes = ()

    config.model_name = "shapes-tiny"
    config.model = model_config(config.model_name)
    # The objective: losses of jclip.losses by name, each with its weight and options,
    # e.g. config.losses.siglip = dict(weight=1.0, ring=True) with config.model.init_bias = -10.
    config.losses = ml_collections.ConfigDict()
    config.losses.clip = dict(weight=1.0)
    # A checkpoint (RUN/checkpoints/STEP or RUN) whose model the `distillation` loss distils.
    config.teacher = placeholder(str)
    # Pretrained weights a new run starts from (jclip.train.init_from): a run, a checkpoint or a weight file
    # (with its model), and the parameter groups to take (e.g. ("image_tower",) for LiT, or ("all",)).
    config.init_from = ml_collections.ConfigDict()
    config.init_from.path = placeholder(str)
    config.init_from.model = placeholder(str)
    config.init_from.parts = ("all",)

    config.batch_size = 128
    config.micro_batches = 1  # >1: gradient caching, the same gradient with one micro-batch's activations
    config.parameter_sharding = "replicated"  # or "fsdp": params and optimizer state split over devices
    config.ema_decay = 0.0  # >0: keep an EMA of the params (e.g. 0.999); evaluations then use it
    config.total_steps = 1000
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"  # or "lamb", "adafactor", "muon"
    config.optimizer.schedule = "cosine"  # after linear warm-up; or "linear", "rsqrt", "constant"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.end_learning_rate = 1e-5
    config.optimizer.warmup_steps = 100
    config.optimizer.weight_decay = 0.1
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.98
    config.optimizer.eps = 1e-6
    config.optimizer.grad_clip_norm = 1.0
    config.optimizer.frozen = ()  # parameter groups to lock, e.g. ("image_tower",) for LiT
    config.optimizer.lr_multipliers = {}  # e.g. {"text_tower": 0.1}
    config.optimizer.layer_decay = placeholder(float)  # e.g. 0.75: layer-wise rate decay in each tower; None: off
    config.optimizer.skip_nonfinite = False  # True: skip updates with non-finite gradients instead of stopping

    config.log_every = 50
    config.tensorboard = True  # event files in <workdir>/tensorboard besides metrics.jsonl
    config.peak_flops_per_device = placeholder(float)  # for MFU where the device is not in the table
    config.profile_steps = placeholder(str)  # "a:b": a JAX profiler trace of steps a..b-1 in <workdir>/profile
    config.checkpoint_every = 250  # steps
    config.checkpoint_every_minutes = placeholder(float)  # also save when this long has passed (checked at logs)
    config.keep_checkpoints = 2  # the last K
    config.keep_checkpoint_every = placeholder(int)  # also keep, for good, every checkpoint at a multiple of this
    config.checkpoint_failure = "stop"  # a save that fails (a full disk) stops the run; "retry": at the next save
    config.resume_strict = False  # True: stop at an unreadable checkpoint instead of resuming from the one before
    config.lock_stale_minutes = 10.0  # a workdir lock not refreshed for this long is a dead trainer's

    config.evaluate = ml_collections.ConfigDict()
    config.evaluate.batch_size = 512
    config.evaluate.every_steps = 0  # 0: evaluate only at the end of training
    # The tasks' default preprocessing; None: the model's (the shorter side resized to data.image_size and
    # centre-cropped, or squashed where data.preprocess squashes, then its value range), here
    # "decode|resize_small(64)|center_crop(64)|value_range(-1, 1)".
    config.evaluate.preprocess = placeholder(str)
    config.evaluate.shapes_config = "default"  # the shapes dataset the tasks below read
    shapes_data = config.evaluate.get_ref("shapes_config")
    test_images = dict(kind="shapes", config=shapes_data, split="test")
    # The tasks `python -m jclip.evaluate` and the trainer run (`--tasks` picks some); see jclip.evaluate.tasks.
    config.evaluate.tasks = ml_collections.ConfigDict()
    config.evaluate.tasks.shapes = dict(kind="shapes", config=shapes_data, split="test")
    config.evaluate.tasks.compositionality = dict(kind="compositionality", source=test_images, attributes="shapes")
    config.evaluate.tasks.shape_probe = dict(kind="linear_probe", dataset="shapes/" + shapes_data, label_key="shape",
                                             train_split="train[:10%]", test_split="test",
                                             where=dict(num_objects=1))  # one object: one shape
    return config
