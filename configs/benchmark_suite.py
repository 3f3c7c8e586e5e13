"""The standard CLIP benchmark suite (LAION's CLIP_benchmark): 37 classification sets, three retrieval sets
and SugarCrepe, on whatever part of it is on disk.

    python -m jclip.evaluate --config configs/benchmark_suite.py --checkpoint runs/vit_b32 --data_dir /data/clip_benchmark

Each dataset is a folder in CLIP_benchmark's WebDataset layout (`jclip.data.benchmark_shards`) under the data
dir, named as the hub names them: `wds_vtab-cifar10` for `clip-benchmark/wds_vtab-cifar10`, fetched with

    huggingface-cli download clip-benchmark/wds_vtab-cifar10 --repo-type dataset --local-dir /data/clip_benchmark/wds_vtab-cifar10

SugarCrepe is `sugar_crepe/` there: the JSON files of github.com/RAIVNLab/sugar-crepe (data/) with COCO's
val2017 images in `sugar_crepe/val2017/`. Absent datasets are listed and skipped (`skip_missing`). The
model's data settings (image size, text length, tokenizer, evaluation preprocessing) come from the
checkpoint, so one suite fits every model. Metrics, as CLIP_benchmark reports them: top-1, top-5 and mean
per-class recall for classification; Recall@1/5/10 both ways for retrieval; accuracy per SugarCrepe kind and
their mean. Every result goes to the table across checkpoints (`--table`), and a second run evaluates only
what the table lacks. Not included: `voc2007_multilabel` (multi-label classification).
"""

import ml_collections
from ml_collections.config_dict import placeholder

# The classification and retrieval sets, as CLIP_benchmark names them (benchmark/webdatasets.txt).
CLASSIFICATION = (
    "imagenet1k", "imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-r", "imagenet-o", "objectnet",
    "fer2013", "voc2007", "sun397", "cars", "fgvc_aircraft", "mnist", "stl10", "gtsrb", "country211",
    "renderedsst2", "vtab/caltech101", "vtab/cifar10", "vtab/cifar100", "vtab/clevr_count_all",
    "vtab/clevr_closest_object_distance", "vtab/diabetic_retinopathy", "vtab/dmlab",
    "vtab/dsprites_label_orientation", "vtab/dsprites_label_x_position", "vtab/dsprites_label_y_position",
    "vtab/dtd", "vtab/eurosat", "vtab/kitti_closest_vehicle_distance", "vtab/flowers", "vtab/pets", "vtab/pcam",
    "vtab/resisc45", "vtab/smallnorb_label_azimuth", "vtab/smallnorb_label_elevation", "vtab/svhn",
)
RETRIEVAL = ("mscoco_captions", "flickr8k", "flickr30k")


def shards(dataset: str) -> dict:
    """The folder of a CLIP_benchmark dataset under the data dir, named as on the hub."""
    return dict(kind="wds", path="{data_dir}/wds_" + dataset.replace("/", "-"))


def task_name(dataset: str) -> str:
    return dataset.split("/")[-1].replace("-", "_")


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict()
    config.data.data_dir = placeholder(str)  # where the wds_* folders are (--data_dir)
    # None: the checkpoint's own (jclip.evaluate.from_checkpoint.with_model_data_settings).
    config.data.image_size = placeholder(int)
    config.data.text_length = placeholder(int)
    config.data.tokenizer = placeholder(str)

    config.evaluate = ml_collections.ConfigDict()
    config.evaluate.batch_size = 256
    config.evaluate.preprocess = placeholder(str)  # None: the model's evaluation preprocessing
    config.evaluate.skip_missing = True  # list and skip the datasets that are not under the data dir
    config.evaluate.tasks = ml_collections.ConfigDict()
    for dataset in CLASSIFICATION:
        # templates=None: the dataset's zeroshot_classification_templates.txt (CLIP's prompts for it)
        config.evaluate.tasks[task_name(dataset)] = dict(kind="zero_shot", dataset=shards(dataset), split="test")
    for dataset in RETRIEVAL:
        config.evaluate.tasks[task_name(dataset)] = dict(kind="retrieval", source=dict(shards(dataset), split="test"))
    config.evaluate.tasks.sugar_crepe = dict(kind="sugarcrepe", path="{data_dir}/sugar_crepe",
                                             image_root="{data_dir}/sugar_crepe/val2017")
    return config
