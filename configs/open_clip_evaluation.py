"""Zero-shot, retrieval and linear-probe evaluation of a CLIP ViT-B/32, such as converted OpenCLIP weights.

    python -m jclip.convert --model ViT-B-32 --input open_clip_model.safetensors --output runs/vit_b32
    python -m jclip.evaluate --config configs/open_clip_evaluation.py --checkpoint runs/vit_b32 \
        --tasks imagenet,cifar10 --config.data.data_dir=/data/tensorflow_datasets

The datasets must be prepared in tfds's data dir (ImageNet needs its manual download); the
tasks read them like OpenCLIP's benchmark does: CLIP's class names and template sets, images
resized on the short side (PIL's bicubic), centre-cropped and normalised with OpenAI's mean and
deviation: OpenCLIP's evaluation transform, pixel for pixel.
"""

import ml_collections

from jclip.models import model_config

def zero_shot(dataset: str, split: str, templates: str, class_names: str = "dataset", **options) -> dict:
    return dict(kind="zero_shot", dataset=dataset, split=split, templates=templates, class_names=class_names,
                **options)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model_name = "ViT-B-32"
    config.model = model_config(config.model_name)  # informative: the model is read from the checkpoint
    config.parameter_sharding = "replicated"  # or "fsdp" for models too large for one device

    config.data = ml_collections.ConfigDict()
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data dir
    config.data.tokenizer = "clip"  # OpenAI's BPE, OpenCLIP's exact ids
    config.data.image_size = 224
    config.data.text_length = 77

    config.evaluate = ml_collections.ConfigDict()
    config.evaluate.batch_size = 256
    config.evaluate.preprocess = "decode|resize_small(224, 'bicubic')|center_crop(224)|clip_normalize"
    config.evaluate.tasks = ml_collections.ConfigDict()
    tasks = config.evaluate.tasks
    tasks.imagenet = zero_shot("imagenet2012", "validation", "openai_imagenet", "imagenet")
    tasks.imagenet_v2 = zero_shot("imagenet_v2", "test", "openai_imagenet", "imagenet")
    tasks.imagenet_sketch = zero_shot("imagenet_sketch", "test", "openai_imagenet", "imagenet")
    tasks.imagenet_a = zero_shot("imagenet_a", "test", "openai_imagenet", "imagenet", classes="present")
    tasks.imagenet_r = zero_shot("imagenet_r", "test", "openai_imagenet", "imagenet", classes="present")
    tasks.cifar10 = zero_shot("cifar10", "test", "cifar")
    tasks.cifar100 = zero_shot("cifar100", "test", "cifar")
    tasks.coco = dict(kind="retrieval",
                      source=dict(kind="tfds", name="coco_captions", split="test", caption_key="captions/text"))
    tasks.coco_compositionality = dict(kind="compositionality", kinds=("swap_words",
                                       "shuffle_trigrams"), source=tasks.coco.source.to_dict())
    tasks.cifar10_probe = dict(kind="linear_probe", dataset="cifar10")
    return config
