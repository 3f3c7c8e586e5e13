"""SugarCrepe (Hsieh et al. 2023, "SugarCrepe: Fixing Hackable Benchmarks for Vision-Language
Compositionality", arXiv 2306.14610): does an image prefer its true caption over a fluent hard negative?

SugarCrepe's negatives are written so that a text-only model cannot tell them from the true captions
(ARO's perturbations, `jclip.evaluate.compositionality`, can be spotted by grammar alone). Its data is a
folder of JSON files, one per perturbation kind (`replace_obj.json`, `swap_att.json`, ...), each a dict
(or list) of `{"filename" or "image": IMAGE, "caption": ..., "negative_caption": ...}`, the images being
COCO val2017 files under `image_root`. The metric is, per kind, the fraction of pairs whose image is more
similar to the caption than to the negative; with the mean over kinds and over each category
(replace / swap / add).
"""

import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np

from jclip.data.benchmark_shards import DatasetMissing

KINDS = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att")
CATEGORIES = ("replace", "swap", "add")


@dataclasses.dataclass
class CaptionPairs:
    """The pairs of one perturbation kind: each pair's image (an index into `images`), caption and negative."""

    image: np.ndarray  # [pairs] int64
    captions: list[str]
    negatives: list[str]


def read_caption_pairs(path: str, image_root: Optional[str] = None,
                       kinds: Optional[Sequence[str]] = None) -> tuple[list[str], dict[str, CaptionPairs]]:
    """(image paths, {kind: pairs}) of the SugarCrepe files in `path`; each image listed once, in the order
    of first use. `kinds=None`: every kind of `KINDS` whose file is present; named kinds must all be there."""
    if not os.path.isdir(path):
        raise DatasetMissing(f"no SugarCrepe folder at {path}; download the JSON files of "
                             "github.com/RAIVNLab/sugar-crepe (data/) and COCO's val2017 images")
    present = [kind for kind in KINDS if os.path.isfile(os.path.join(path, f"{kind}.json"))]
    if kinds is None:
        kinds = present
        if not kinds:
            raise DatasetMissing(f"{path} holds none of SugarCrepe's files ({', '.join(k + '.json' for k in KINDS)})")
    missing = [kind for kind in kinds if kind not in present]
    if missing:
        raise FileNotFoundError(f"{path} has no {', '.join(k + '.json' for k in missing)}; the kinds present "
                                f"are {present}")
    root = image_root or path
    images, index, pairs = [], {}, {}
    for kind in kinds:
        file = os.path.join(path, f"{kind}.json")
        with open(file, encoding="utf-8") as f:
            entries = json.load(f)
        entries = list(entries.values()) if isinstance(entries, dict) else entries
        chosen, captions, negatives = [], [], []
        for number, entry in enumerate(entries):
            image = entry.get("filename", entry.get("image")) if isinstance(entry, dict) else None
            if not image or not entry.get("caption") or not entry.get("negative_caption"):
                raise ValueError(f"{file}, entry {number}: needs 'filename' (or 'image'), 'caption' and "
                                 f"'negative_caption'; it has {sorted(entry) if isinstance(entry, dict) else entry!r}")
            image = image if os.path.isabs(image) else os.path.join(root, image)
            if image not in index:
                index[image] = len(images)
                images.append(image)
            chosen.append(index[image])
            captions.append(str(entry["caption"]))
            negatives.append(str(entry["negative_caption"]))
        pairs[kind] = CaptionPairs(np.array(chosen, np.int64), captions, negatives)
    return images, pairs


def caption_pair_metrics(wins: dict[str, np.ndarray]) -> dict:
    """Accuracy and count per kind from the per-pair wins, then the mean over each category and over all kinds."""
    metrics = {kind: {"accuracy": float(w.mean()) if len(w) else float("nan"), "count": int(len(w))}
               for kind, w in wins.items()}
    for category in CATEGORIES:
        measured = [m["accuracy"] for kind, m in metrics.items() if kind.startswith(category + "_") and m["count"]]
        if measured:
            metrics[category] = float(np.mean(measured))
    measured = [m["accuracy"] for m in metrics.values() if isinstance(m, dict) and m["count"]]
    metrics["mean"] = float(np.mean(measured)) if measured else float("nan")
    return metrics
