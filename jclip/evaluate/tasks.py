"""Evaluation tasks: what `config.evaluate.tasks` lists, run on a model's parameters.

Each entry is `name: dict(kind=KIND, **options)`; the kinds and their options:

- `shapes` (config, split, preprocess): the built-in shapes suite.
- `zero_shot` (dataset, split, label_key, image_key, class_names, templates, preprocess, classes, where):
  zero-shot classification of labelled images by prompt ensembling; top-1/top-5 and mean per-class recall.
  `dataset`: a tfds dataset's name or directory, `dict(kind="folder", path=DIR)` (a subfolder of images per
  class), `dict(kind="csv", path=FILE, image_column="filepath", label_column="label", image_root=None)` or
  `dict(kind="wds", path=DIR)` (CLIP_benchmark's shards); `{split}` and `{data_dir}` in a path are filled in
  (`jclip.data.labelled_images`); unreadable images of files and shards are skipped and counted
  (`skipped_images`). `class_names`: "dataset" (the label feature's names, the folder names, the CSV's label
  names, the shards' classnames.txt), "imagenet" (CLIP's ImageNet names), a benchmark dataset's name
  (`prompts.dataset_class_names`) or a list; `templates`: a set of `jclip.data.prompts.TEMPLATES`, a
  benchmark dataset's name, a list, or None: the dataset's own (the shards' templates file), else "simple";
  `classes="present"` restricts the classifier to the classes present in the labels (ImageNet-A/-R's
  200-class subsets); `where` (tfds) keeps the examples whose features have the given values.
- `retrieval` (source, preprocess, ks): image→text and text→image Recall@K on an image–text source
  (an entry like those of `config.data.sources`, `dict(kind="wds", path=DIR)` for CLIP_benchmark's
  Flickr30k and MSCOCO), with every caption of an image relevant to it; similarities in tiles, so memory
  grows linearly with the set (`jclip.evaluate.retrieval`).
- `compositionality` (source, preprocess, attributes, kinds, seed): ARO-style true vs perturbed
  captions (`jclip.evaluate.compositionality`); `attributes="shapes"` names the shapes words.
- `sugarcrepe` (path, image_root, kinds, preprocess): SugarCrepe's true caption vs a fluent hard negative,
  per perturbation kind and their means (`jclip.evaluate.sugarcrepe`).
- `linear_probe` (dataset, train_split, test_split, label_key, image_key, class_names, preprocess, shots,
  l2_values, seed, where): closed-form ridge probes on frozen image embeddings, few-shot and on the full train
  split; `dataset` and `class_names` as for `zero_shot` (`path="/data/pets/{split}"` for split folders).

A task whose data is not on disk raises `DatasetMissing`; with `skip_missing`, `run_tasks` reports such tasks as
absent instead (the benchmark suite's config runs whatever part of the suite is present).

Every task embeds with `Evaluator`, sharded over all devices and processes. A task's `preprocess` is by default
the evaluator's, the model's evaluation preprocessing (`preprocess.evaluation_spec`: the shorter side resized to
the model's image size and centre-cropped, or squashed as training did, then the training value range or
normalisation); `check_task_inputs` puts one
image of each task through it before a training run starts.
"""

import dataclasses
import inspect
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
import tensorflow as tf
from flax import linen as nn
from jax.sharding import Mesh

from jclip import parallel
from jclip.data import prompts, shapes, sources
from jclip.data.benchmark_shards import DatasetMissing
from jclip.data.labelled_images import LabelledImages, read_labelled_images
from jclip.data.negatives import KINDS
from jclip.data.preprocess import example_input
from jclip.evaluate import plots
from jclip.evaluate.classification import (mean_per_class_recall, per_class_accuracy, top_k_accuracy,
                                           zero_shot_classifier)
from jclip.evaluate.compositionality import compositionality, true_caption_preferred
from jclip.evaluate.datasets import LocalImages
from jclip.evaluate.embed import embed_all, embed_stream
from jclip.evaluate.linear_probe import DEFAULT_L2, probe_accuracy
from jclip.evaluate.retrieval import retrieval_recalls
from jclip.evaluate.shapes_benchmark import evaluate_shapes, format_table
from jclip.evaluate.sugarcrepe import caption_pair_metrics, read_caption_pairs

@dataclasses.dataclass
class Evaluator:
    """A model's parameters and what it takes to embed images and texts with them, sharded over `mesh`."""

    model: nn.Module
    params: Any
    tokenizer: Any
    mesh: Mesh
    batch_size: int
    image_size: int
    text_length: int
    preprocess: str  # the default evaluation preprocessing spec (`jclip.data.preprocess`)
    data_dir: Optional[str] = None

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] normalised text embeddings, on every process."""
        encode = lambda params, tokens: self.model.apply({"params": params}, tokens, method=self.model.encode_text)
        return embed_all(encode, self.params, self.tokenizer(list(texts), self.text_length), self.batch_size, self.mesh)

    def local_images(self, name: str, examples: tf.data.Dataset, count: int, preprocess: Optional[str],
                     fields: Optional[Callable[[dict], dict]] = None, skip_unreadable: bool = False) -> LocalImages:
        """`LocalImages` of `examples`, preprocessed with `preprocess` or by default with the evaluator's."""
        return LocalImages(name, examples, count, preprocess or self.preprocess, fields, skip_unreadable)

    def embed_images(self, images: LocalImages) -> np.ndarray:
        """[examples of all processes, dim] normalised image embeddings, process 0's first, on every process."""
        encode = lambda params, x: self.model.apply({"params": params}, x, method=self.model.encode_image)
        local_size = self.batch_size // jax.process_count()
        example = example_input(images.spec, self.image_size)
        return embed_stream(encode, self.params, images.batches(local_size), images.count, self.batch_size,
                            self.mesh, example)

    def embed_array(self, images: np.ndarray) -> np.ndarray:
        """Embeddings of preprocessed images that every process holds."""
        encode = lambda params, x: self.model.apply({"params": params}, x, method=self.model.encode_image)
        return embed_all(encode, self.params, images, self.batch_size, self.mesh)

    @property
    def scale(self) -> float:
        return float(jax.device_get(jax.numpy.exp(self.params["logit_scale"])))


@dataclasses.dataclass
class TaskResult:
    """A task's metrics (JSON: fractions, counts, names), its table, and how to draw its figure, if any."""

    metrics: dict
    table: str
    plot: Optional[Callable[[str], None]] = None  # draws the figure into a PNG file at the given path
    outputs: dict = dataclasses.field(default_factory=dict)  # per-example arrays (predictions), not in results.json

    @property
    def absent(self) -> bool:
        """The task did not run: its data is not on disk (`metrics["absent"]` says why)."""
        return "absent" in self.metrics


def absent_result(reason: str) -> TaskResult:
    return TaskResult({"absent": reason}, f"not evaluated: {reason}")


def metrics_table(metrics: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Markdown rows `| metric | value |` of the numeric leaves: fractions as percentages, counts as they are."""
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if key == "per_class_accuracy":
            continue  # in results.json and the figure; too long for a table
        if isinstance(value, Mapping):
            rows += metrics_table(value, f"{name} / ")
        elif isinstance(value, bool):
            continue
        elif isinstance(value, float):
            rows.append(f"| {name} (%) | {100 * value:.2f} |")
        elif isinstance(value, int):
            rows.append(f"| {name} | {value} |")
    return rows


def _table(metrics: Mapping[str, Any]) -> str:
    return "\n".join(["| metric | value |", "|---|---:|"] + metrics_table(metrics))


def _labelled_images(evaluator: Evaluator, data: LabelledImages, preprocess: Optional[str]):
    """(image embeddings, labels, number of images skipped) of `data`'s examples in all processes. Images of
    folder, CSV and shard datasets that cannot be read or decoded are skipped, counted and named in a warning."""
    images = evaluator.local_images(data.name, data.examples, data.num_examples, preprocess,
                                    fields=lambda ex: {"label": ex["label"]}, skip_unreadable=data.skips_unreadable)
    embeddings = evaluator.embed_images(images)
    labels = parallel.gather_from_processes(np.asarray(images.fields.get("label", []), np.int64))
    return embeddings, labels, images.gather_skipped()


def zero_shot_task(evaluator: Evaluator, dataset, split: str = "test", label_key: str = "label",
                   image_key: str = "image", class_names="dataset", templates=None,
                   preprocess: Optional[str] = None, classes: str = "all", ks: Sequence[int] = (1, 5),
                   where: Optional[Mapping[str, int]] = None):
    data = read_labelled_images(dataset, split, label_key=label_key, image_key=image_key, class_names=class_names,
                                where=where, data_dir=evaluator.data_dir)
    images, labels, skipped = _labelled_images(evaluator, data, preprocess)
    names = data.class_names
    template_set = prompts.templates(templates or data.templates or "simple")
    if classes not in ("all", "present"):
        raise ValueError(f"classes={classes!r}: use 'all' or 'present'")
    used = np.unique(labels) if classes == "present" else np.arange(len(names))
    classifier = zero_shot_classifier(evaluator.embed_texts, [names[c] for c in used], template_set)
    targets = np.searchsorted(used, labels)
    scores = images @ classifier.T
    predictions = scores.argmax(axis=1)
    per_class = per_class_accuracy(predictions, targets, len(used))
    metrics = {
        "dataset": dataset, "split": split, "num_examples": int(len(labels)), "skipped_images": skipped,
        "num_classes": int(len(used)), "num_templates": len(template_set),
        **{f"top{k}": v for k, v in top_k_accuracy(scores, targets, ks).items()},
        "mean_per_class_recall": mean_per_class_recall(predictions, targets, len(used)),
        "per_class_accuracy": {names[c]: (None if np.isnan(a) else float(a)) for c, a in zip(used, per_class)},
    }
    title = f"Zero-shot accuracy per class, {data.name} (top-1 {100 * metrics['top1']:.1f} %)"
    return TaskResult(metrics, _table(metrics),
                      lambda path: plots.per_class_bars(path, [names[c] for c in used], per_class, title),
                      outputs={"predictions": used[predictions], "labels": labels, "scores": scores})


def _captioned_images(evaluator: Evaluator, source: Mapping[str, Any], preprocess: Optional[str]):
    """(image embeddings, captions per image, number of images skipped) of an image–text source, all processes'
    examples; an image that cannot be read or decoded is skipped with its captions, counted and named."""
    local, _ = sources.build_source(source, evaluator.data_dir)
    images = evaluator.local_images(local.name, local.examples, local.num_examples, preprocess,
                                    fields=lambda ex: {"captions": ex["captions"]}, skip_unreadable=True)
    embeddings = evaluator.embed_images(images)
    skipped = images.gather_skipped()
    local_captions = [[c.decode("utf-8").strip() for c in captions] for captions in images.fields.get("captions", [])]
    local_captions = [[c for c in captions if c] for captions in local_captions]
    counts = parallel.gather_from_processes(np.array([len(c) for c in local_captions], np.int64))
    flat = parallel.gather_strings([c for captions in local_captions for c in captions])
    ends = np.cumsum(counts)
    return embeddings, [flat[end - count:end] for count, end in zip(counts, ends)], skipped


def retrieval_task(evaluator: Evaluator, source: Mapping[str, Any], preprocess: Optional[str] = None,
                   ks: Sequence[int] = (1, 5, 10)):
    images, captions, skipped = _captioned_images(evaluator, source, preprocess)
    owner = np.array([i for i, c in enumerate(captions) for _ in c], np.int64)
    texts = evaluator.embed_texts([c for per_image in captions for c in per_image])
    has_caption = np.array([len(c) > 0 for c in captions])
    recalls = retrieval_recalls(images, texts, owner, ks)
    metrics = {"num_images": int(has_caption.sum()), "num_captions": int(len(owner)), "skipped_images": skipped,
               **{direction: {f"R@{k}": v for k, v in recall.items()} for direction, recall in recalls.items()}}
    shown = np.flatnonzero(has_caption)[:16]
    first_caption = np.array([np.flatnonzero(owner == i)[0] for i in shown], np.int64)
    return TaskResult(metrics, _table(metrics), lambda path: plots.similarity_matrix(
        path, images[shown] @ texts[first_caption].T, [captions[i][0] for i in shown],
        "Image–caption similarity (rows: images, columns: their first captions)"))


def compositionality_task(evaluator: Evaluator, source: Mapping[str, Any], preprocess: Optional[str] = None,
                          attributes=(), kinds: Sequence[str] = KINDS, seed: int = 0):
    images, captions, _ = _captioned_images(evaluator, source, preprocess)
    keep = np.array([len(c) > 0 for c in captions])
    if attributes == "shapes":
        attributes = (shapes.COLOURS, shapes.SIZES, shapes.SHAPES)
    metrics = compositionality(images[keep], [c[0] for c in captions if c], evaluator.embed_texts, attributes,
                               tuple(kinds), seed)
    measured = [k for k in metrics if metrics[k]["count"]]
    return TaskResult(metrics, _table(metrics), lambda path: plots.bars(
        path, measured, [metrics[k]["accuracy"] for k in measured],
        "True caption preferred over the perturbed one", "accuracy", chance=0.5))


def _caption_pair_images(images: Sequence[str]) -> tuple[str, tf.data.Dataset, int]:
    """(name, this process's contiguous slice of the image files with their indices, its size)."""
    begin, end = sources.process_range(len(images))
    examples = tf.data.Dataset.from_tensor_slices(
        (tf.constant(list(images[begin:end]), tf.string), tf.range(begin, end, dtype=tf.int64))
    ).map(lambda path, index: {"image": tf.constant(b""), "image_path": path, "index": index})
    return "SugarCrepe's images", examples, end - begin


def _sugarcrepe_files(path: str, image_root: Optional[str], kinds: Optional[Sequence[str]],
                      data_dir: Optional[str]):
    """`read_caption_pairs` of the task's paths, `{data_dir}` filled in."""
    return read_caption_pairs(sources.resolve_data_dir(path, data_dir),
                              image_root and sources.resolve_data_dir(image_root, data_dir), kinds)


def sugarcrepe_task(evaluator: Evaluator, path: str, image_root: Optional[str] = None,
                    kinds: Optional[Sequence[str]] = None, preprocess: Optional[str] = None):
    image_files, pairs = _sugarcrepe_files(path, image_root, kinds, evaluator.data_dir)
    name, examples, count = _caption_pair_images(image_files)
    images = evaluator.local_images(name, examples, count, preprocess, fields=lambda ex: {"index": ex["index"]},
                                    skip_unreadable=True)
    embedded = evaluator.embed_images(images)
    row = np.full(len(image_files), -1, np.int64)  # each image's row of `embedded`; -1: skipped
    row[parallel.gather_from_processes(np.asarray(images.fields.get("index", []), np.int64))] = np.arange(len(embedded))
    skipped = images.gather_skipped()
    wins = {}
    for kind, kind_pairs in pairs.items():
        keep = np.flatnonzero(row[kind_pairs.image] >= 0)  # pairs whose image was read
        if not len(keep):
            wins[kind] = np.zeros(0, bool)
            continue
        texts = evaluator.embed_texts([kind_pairs.captions[i] for i in keep] + [kind_pairs.negatives[i] for i in keep])
        true_texts, negative_texts = np.split(texts, 2)
        wins[kind] = true_caption_preferred(embedded[row[kind_pairs.image[keep]]], true_texts, negative_texts)
    metrics = {**caption_pair_metrics(wins), "num_images": int(len(embedded)), "skipped_images": skipped}
    measured = [k for k in pairs if metrics[k]["count"]]
    return TaskResult(metrics, _table(metrics), lambda path: plots.bars(
        path, measured, [metrics[k]["accuracy"] for k in measured],
        f"SugarCrepe: true caption preferred over the hard negative (mean {100 * metrics['mean']:.1f} %)",
        "accuracy", chance=0.5))


def linear_probe_task(evaluator: Evaluator, dataset, train_split: str = "train", test_split: str = "test",
                      label_key: str = "label", image_key: str = "image", class_names="dataset",
                      preprocess: Optional[str] = None, shots: Sequence[int] = (1, 5, 10, 25),
                      l2_values: Sequence[float] = DEFAULT_L2, seed: int = 0,
                      where: Optional[Mapping[str, int]] = None):
    train_data, test_data = (read_labelled_images(dataset, split, label_key=label_key, image_key=image_key,
                                                  class_names=class_names, where=where, data_dir=evaluator.data_dir)
                             for split in (train_split, test_split))
    if train_data.classes != test_data.classes:
        differ = sorted(set(train_data.classes) ^ set(test_data.classes)) or ["(their order)"]
        raise ValueError(f"the classes of {train_data.name} and {test_data.name} differ: {', '.join(differ[:5])}; "
                         "give both splits the same classes (for CSV label names: class_names, the list of all)")
    train, train_labels, train_skipped = _labelled_images(evaluator, train_data, preprocess)
    test, test_labels, test_skipped = _labelled_images(evaluator, test_data, preprocess)
    names = train_data.class_names
    num_classes = len(names)
    metrics = {"dataset": dataset, "num_train": int(len(train_labels)), "num_test": int(len(test_labels)),
               "skipped_images": train_skipped + test_skipped}
    for count in (*shots, None):
        name = "full" if count is None else f"{count}-shot"
        metrics[name] = probe_accuracy(train, train_labels, test, test_labels, num_classes, count,
                                       tuple(l2_values), seed)
    settings = [f"{k}-shot" for k in shots] + ["full"]
    table = ["| metric | value |", "|---|---:|", f"| training examples (full) | {metrics['num_train']} |",
             f"| test examples | {metrics['num_test']} |"]
    if metrics["skipped_images"]:
        table.append(f"| images skipped (unreadable) | {metrics['skipped_images']} |")
    for setting in settings:
        best = max((v, k) for k, v in metrics[setting].items() if k != "best")
        table.append(f"| {setting} accuracy (%), best of {len(l2_values)} λ ({best[1]}) | {100 * best[0]:.2f} |")
    return TaskResult(metrics, "\n".join(table), lambda path: plots.bars(
        path, settings, [metrics[s]["best"] for s in settings],
        f"Linear probe on frozen image embeddings, {train_data.name} (best regularisation)", "test accuracy"))


def shapes_task(evaluator: Evaluator, config: str = "default", split: str = "test", preprocess: Optional[str] = None):
    metrics = evaluate_shapes(evaluator, shapes.prepare(config, evaluator.data_dir), split,
                              preprocess or evaluator.preprocess)
    return TaskResult(metrics, format_table(metrics))


TASK_KINDS = {"shapes": shapes_task, "zero_shot": zero_shot_task, "retrieval": retrieval_task,
              "compositionality": compositionality_task, "linear_probe": linear_probe_task,
              "sugarcrepe": sugarcrepe_task}


def select_tasks(tasks: Mapping[str, Mapping[str, Any]], names: Optional[Sequence[str]] = None) -> dict:
    """`{name: (kind, options)}` of the entries of `tasks` named in `names` (default: all), checked."""
    names = list(tasks) if names is None else list(names)
    unknown = [n for n in names if n not in tasks]
    if unknown:
        raise ValueError(f"no evaluation task(s) {unknown} in config.evaluate.tasks; it has {sorted(tasks)}")
    selected = {}
    for name in names:
        options = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in dict(tasks[name]).items()}
        kind = options.pop("kind", None)
        if kind not in TASK_KINDS:
            raise ValueError(f"config.evaluate.tasks.{name}.kind={kind!r}; use one of {sorted(TASK_KINDS)}")
        try:
            inspect.signature(TASK_KINDS[kind]).bind(None, **options)
        except TypeError as error:
            raise ValueError(f"bad options for evaluation task {name!r} (kind {kind!r}): {error}") from None
        selected[name] = (kind, options)
    return selected


def run_tasks(evaluator: Evaluator, tasks: Mapping[str, Mapping[str, Any]],
              names: Optional[Sequence[str]] = None, skip_missing: bool = False,
              progress: Optional[Callable[[str], None]] = None) -> dict[str, TaskResult]:
    """Run the named tasks of `tasks` (default: all) in order; every process runs them together. With
    `skip_missing`, a task whose dataset is not on disk is left out and listed in `missing` instead of stopping
    the run: its result is `absent_result`. `progress(name)` is called as each task starts."""
    results = {}
    for name, (kind, options) in select_tasks(tasks, names).items():
        if progress:
            progress(name)
        try:
            results[name] = TASK_KINDS[kind](evaluator, **options)
        except DatasetMissing as error:
            if not skip_missing:
                raise
            results[name] = absent_result(str(error))
    absent = [name for name, result in results.items() if result.absent]
    if absent and jax.process_index() == 0:
        print(f"skipped {len(absent)} task(s) whose data is absent: {', '.join(absent)}", flush=True)
    return results


def _task_images(kind: str, options: Mapping[str, Any],
                 data_dir: Optional[str]) -> list[tuple[str, tf.data.Dataset, bool]]:
    """(name, examples with an encoded "image" / "image_path", whether the task skips unreadable images) of
    each image set a task of `kind` reads; `options` are all the task function's arguments, defaults included."""
    if kind == "shapes":
        builder = shapes.prepare(options["config"], data_dir)
        examples, _ = sources.read_tfds_slice(builder, options["split"], "image")
        return [(builder.name, examples.map(lambda ex: {"image": ex["image"], "image_path": ""}), False)]
    if kind in ("zero_shot", "linear_probe"):
        splits = [options["split"]] if kind == "zero_shot" else [options["train_split"], options["test_split"]]
        keys = {key: options[key] for key in ("label_key", "image_key", "where", "class_names")}
        sets = [read_labelled_images(options["dataset"], split, data_dir=data_dir, **keys) for split in splits]
        return [(data.name, data.examples, data.skips_unreadable) for data in sets]
    if kind == "sugarcrepe":
        images, _ = _sugarcrepe_files(options["path"], options["image_root"], options["kinds"], data_dir)
        name, examples, _ = _caption_pair_images(images)
        return [(name, examples, True)]
    source, _ = sources.build_source(options["source"], data_dir)
    return [(source.name, source.examples, True)]


def check_task_inputs(tasks: Mapping[str, Mapping[str, Any]], image_size: int, preprocess: str,
                      data_dir: Optional[str] = None) -> None:
    """Stop with a clear message unless every task's data can be read and its preprocessing (the task's own,
    or `preprocess`) makes `[image_size, image_size, 3]` images (or the patch inputs of its naflex op) of it:
    one example of each image set goes through the ops. The trainer checks this before its first step, not after
    the training."""
    for name, (kind, options) in select_tasks(tasks).items():
        arguments = inspect.signature(TASK_KINDS[kind]).bind(None, **options)
        arguments.apply_defaults()  # the task's own defaults (its split, its class names, ...)
        options = arguments.arguments
        spec = options["preprocess"] or preprocess
        try:
            image_sets = _task_images(kind, options, data_dir)
            for set_name, examples, skip_unreadable in image_sets:
                few = 16 if skip_unreadable else 1  # the first readable of a few, where the task skips unreadable ones
                first = next(LocalImages(set_name, examples.take(few), few, spec, skip_unreadable=skip_unreadable)
                             .batches(1), None)
                if first is None:
                    continue
                shape = jax.tree.map(lambda x: x.shape[1:], first)
                expected = jax.tree.map(lambda x: x.shape, example_input(spec, image_size))
                if shape != expected:
                    raise ValueError(f"its preprocessing {spec!r} turns an image of {set_name} into shape "
                                     f"{shape}, but the model takes {expected}; resize to "
                                     f"config.data.image_size={image_size} (resize_small and center_crop), or drop "
                                     "the task's own preprocess to use the model's evaluation preprocessing")
        except (ValueError, FileNotFoundError) as error:
            raise ValueError(f"evaluation task {name!r} cannot run: {error}") from None
