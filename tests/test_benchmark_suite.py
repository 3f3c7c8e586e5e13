"""The benchmark suite on data the tests make: CLIP_benchmark's retrieval shards, SugarCrepe's files, the suite
config over a data dir holding part of the suite, and the results table across checkpoints."""

import csv
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from evaluation_tasks import micro_evaluator
from helpers import REPO, run_workers
from jclip import models, parallel
from jclip.checkpoint import Checkpointer
from jclip.evaluate.results_table import read_table, task_rows, write_table
from jclip.evaluate.retrieval import recall_at_k
from jclip.evaluate.tasks import run_tasks
from test_labelled_images import write_benchmark_shards, write_shard
import xla_flags

COUNT = 13  # images; batches of 8 do not divide them
DAMAGED = 9  # the index (in the retrieval shards) of a sample whose image does not decode
KINDS = {"replace_obj": [0, 1, 2, 3, 4, 5], "swap_att": [6, 7, 8, 9], "add_att": [2, 10, 11, 12]}  # pairs' images


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), colour, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _colours():
    return np.random.default_rng(0).integers(0, 256, (COUNT, 3))


def _captions(index: int) -> list[str]:
    return [f"picture {index}", f"a shape of colour {index * 7 % 5}"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """A data dir with part of the suite: a classification and a retrieval set in CLIP_benchmark's layout (the
    latter with a damaged sample), a one-caption copy as plain tar, and SugarCrepe's files with one unreadable
    image."""
    root = tmp_path_factory.mktemp("suite")
    images = [_png(colour) for colour in _colours()]
    retrieval = [{"png": image, "txt": "\n".join(_captions(i)).encode()} for i, image in enumerate(images)]
    retrieval.insert(DAMAGED, {"png": b"not an image", "txt": b"lost"})
    write_benchmark_shards(root / "wds_flickr30k", "test", retrieval, [7, 7], {"dataset_type.txt": ["retrieval"]})
    single = [{"png": image, "txt": _captions(i)[0].encode()} for i, image in enumerate(images)]
    write_benchmark_shards(root / "single", "test", single, [5, 8], {"dataset_type.txt": ["retrieval"]})
    write_shard(root / "single.tar", single)
    classes = [{"png": image, "cls": str(i % 3).encode()} for i, image in enumerate(images)]
    write_benchmark_shards(root / "wds_vtab-cifar10", "test", classes, [COUNT],
                           {"classnames.txt": ["red", "green", "blue"],
                            "zeroshot_classification_templates.txt": ["a photo of a {c}."]})
    crepe = root / "sugar_crepe"
    os.makedirs(crepe / "val2017")
    for i, image in enumerate(images):
        (crepe / "val2017" / f"{i:012d}.jpg").write_bytes(image if i != 7 else b"truncated")
    for kind, chosen in KINDS.items():
        entries = [{"filename" if kind != "add_att" else "image": f"{i:012d}.jpg", "caption": _captions(i)[0],
                    "negative_caption": _captions(i + 1)[1]} for i in chosen]
        (crepe / f"{kind}.json").write_text(json.dumps(
            {str(2 * n): e for n, e in enumerate(entries)} if kind != "add_att" else entries))
    return root


def _evaluator(suite, devices):
    return micro_evaluator(str(suite), parallel.make_mesh(devices), batch_size=8)


def _embedded(evaluator, images):
    return evaluator.embed_array(np.stack([np.asarray(Image.open(io.BytesIO(i)), np.float32) / 127.5 - 1
                                           for i in images]))


@pytest.mark.parametrize("devices", [1, 8])
def test_retrieval_shards_give_what_the_same_samples_as_plain_tar_give(suite, devices):
    results = run_tasks(_evaluator(suite, devices), {
        "shards": dict(kind="retrieval", source=dict(kind="wds", path=str(suite / "single"))),
        "tar": dict(kind="retrieval", source=dict(kind="tar", pattern=str(suite / "single.tar")))})
    assert results["shards"].metrics == results["tar"].metrics
    assert results["shards"].metrics["num_captions"] == COUNT


def test_retrieval_shards_with_several_captions_and_a_damaged_sample(suite, capsys):
    evaluator = _evaluator(suite, 8)
    metrics = run_tasks(evaluator, {"t": dict(kind="retrieval", source=dict(kind="wds", path="{data_dir}/wds_flickr30k"))})["t"].metrics
    images = _embedded(evaluator, [_png(colour) for colour in _colours()])
    texts = evaluator.embed_texts([caption for i in range(COUNT) for caption in _captions(i)])
    relevant = np.repeat(np.eye(COUNT, dtype=bool), 2, axis=1)
    similarity = images @ texts.T
    assert metrics["num_images"] == COUNT and metrics["num_captions"] == 2 * COUNT and metrics["skipped_images"] == 1
    assert metrics["image_to_text"] == {f"R@{k}": v for k, v in recall_at_k(similarity, relevant, (1, 5, 10)).items()}
    assert metrics["text_to_image"] == {f"R@{k}": v for k, v in recall_at_k(similarity.T, relevant.T, (1, 5, 10)).items()}
    assert f"warning: skipped 1 image(s) of {suite}/wds_flickr30k/test that cannot be read or decoded: #{DAMAGED}" \
        in capsys.readouterr().out


def test_sugarcrepe_by_hand(suite):
    """Per kind, the fraction of pairs whose image is nearer its caption than the negative; pairs of the
    unreadable image (7) are left out; the means over each category and over the kinds."""
    evaluators = [_evaluator(suite, devices) for devices in (1, 8)]
    task = {"crepe": dict(kind="sugarcrepe", path="{data_dir}/sugar_crepe", image_root="{data_dir}/sugar_crepe/val2017")}
    metrics, again = (run_tasks(evaluator, task)["crepe"].metrics for evaluator in evaluators)
    assert metrics == again
    images = _embedded(evaluators[1], [_png(colour) for colour in _colours()])
    expected = {}
    for kind, chosen in KINDS.items():
        kept = [i for i in chosen if i != 7]
        true = evaluators[1].embed_texts([_captions(i)[0] for i in kept])
        negative = evaluators[1].embed_texts([_captions(i + 1)[1] for i in kept])
        wins = np.sum(images[kept] * true, 1) > np.sum(images[kept] * negative, 1)
        expected[kind] = {"accuracy": float(wins.mean()), "count": len(kept)}
    assert {kind: metrics[kind] for kind in KINDS} == expected
    assert metrics["replace"] == expected["replace_obj"]["accuracy"]
    assert metrics["add"] == expected["add_att"]["accuracy"]
    assert metrics["mean"] == pytest.approx(np.mean([e["accuracy"] for e in expected.values()]))
    assert metrics["skipped_images"] == 1 and metrics["num_images"] == COUNT - 1


@pytest.mark.parametrize("case", ["no folder", "kind absent", "bad entry", "classes as captions"])
def test_bad_input_is_one_line(suite, tmp_path, case):
    (tmp_path / "swap_obj.json").write_text(json.dumps([{"filename": "1.jpg", "caption": "a cat"}]))
    task, error, message = {
        "no folder": (dict(kind="sugarcrepe", path=str(tmp_path / "absent")), FileNotFoundError,
                      f"no SugarCrepe folder at {tmp_path}/absent; download the JSON files"),
        "kind absent": (dict(kind="sugarcrepe", path=str(suite / "sugar_crepe"), kinds=["swap_obj"]),
                        FileNotFoundError, f"{suite}/sugar_crepe has no swap_obj.json; the kinds present are "
                        "['replace_obj', 'swap_att', 'add_att']"),
        "bad entry": (dict(kind="sugarcrepe", path=str(tmp_path)), ValueError,
                      f"{tmp_path}/swap_obj.json, entry 0: needs 'filename' (or 'image'), 'caption' and "
                      "'negative_caption'; it has ['caption', 'filename']"),
        "classes as captions": (dict(kind="retrieval", source=dict(kind="wds", path=str(suite / "wds_vtab-cifar10"))),
                                ValueError, f"{suite}/wds_vtab-cifar10 is a classification set, not an image–caption "
                                "one (its dataset_type.txt is not 'retrieval'): evaluate it with zero_shot"),
    }[case]
    with pytest.raises(error) as raised:
        run_tasks(_evaluator(suite, 1), {"t": task})
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_two_processes_give_the_single_process_results(suite, tmp_path):
    """The damaged retrieval sample and SugarCrepe's unreadable image are both in process 1's half."""
    tasks = {"retrieval": dict(kind="retrieval", source=dict(kind="wds", path="{data_dir}/wds_flickr30k")),
             "crepe": dict(kind="sugarcrepe", path="{data_dir}/sugar_crepe",
                           image_root="{data_dir}/sugar_crepe/val2017")}
    run_workers("evaluation_worker.py", 2, suite, tmp_path / "results.json", json.dumps(tasks), 8)
    single = run_tasks(_evaluator(suite, 8), tasks)
    with open(tmp_path / "results.json") as f:
        assert json.load(f) == json.loads(json.dumps({name: result.metrics for name, result in single.items()}))


def _run_with_two_checkpoints(directory) -> str:
    """A run directory with parameters-only checkpoints of `test-micro` (with CLIP's tokenizer) at steps 0 and 5,
    their records holding the data settings, as converted checkpoints do."""
    overrides = dict(text=dict(vocab_size=49408))
    model = models.create("test-micro", **overrides)
    record = {"model_name": "test-micro", "data": {"image_size": 64, "text_length": 16, "tokenizer": "clip",
                                                  "preprocess": "decode|resize(64)|value_range(-1, 1)"}}
    checkpointer = Checkpointer(str(directory), models.model_config("test-micro", **overrides), save_every=1, keep=5)
    try:
        for step in (0, 5):
            params = model.init(jax.random.key(step), np.zeros((1, 64, 64, 3), np.float32),
                                np.zeros((1, 16), np.int32))["params"]
            checkpointer.save(step, {"params": params}, lambda: {**record, "parameters_only": True}, force=True)
            checkpointer.wait()
    finally:
        checkpointer.close()
    return str(directory)


def test_the_suite_config_runs_what_is_present_and_fills_one_table(suite, tmp_path):
    """The README's command on a data dir holding two of the suite's datasets (and SugarCrepe): those run, the
    absent ones are listed; every kept checkpoint goes into one table with its figure; a second run evaluates
    nothing new."""
    run = _run_with_two_checkpoints(tmp_path / "micro")
    table = tmp_path / "suite.csv"
    command = [sys.executable, "-m", "jclip.evaluate", "--config", "configs/benchmark_suite.py", "--checkpoint", run,
               "--all_steps", "--data_dir", str(suite), "--table", str(table), "--config.evaluate.batch_size=8"]
    env = {**os.environ, "XLA_FLAGS": xla_flags.with_devices(2)}
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("skipped 38 task(s) whose data is absent: caltech101, cars, cifar100, ") == 2
    rows = read_table(str(table))
    evaluated = {(row["step"], row["task"]) for row in rows}
    assert evaluated == {(step, task) for step in (0, 5) for task in ("cifar10", "flickr30k", "sugar_crepe")}
    values = {(row["step"], row["task"], row["metric"]): row["value"] for row in rows}
    assert values[0, "cifar10", "num_examples"] == COUNT and values[5, "flickr30k", "num_captions"] == 2 * COUNT
    assert values[0, "cifar10", "num_templates"] == 1  # the shards' own templates
    assert {row["model"] for row in rows} == {"micro"}
    assert os.path.exists(tmp_path / "suite.png")
    with open(table) as f:
        assert next(csv.reader(f)) == ["model", "checkpoint", "step", "task", "metric", "value"]
    with open(os.path.join(run, "results.json")) as f:
        assert json.load(f)["tasks"]["caltech101"]["absent"].startswith(f"no CLIP_benchmark dataset at {suite}/wds_vtab-caltech101")
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("task(s) whose data is absent") == 2  # the absent ones are looked for again ...
    assert "Evaluation of" in second.stdout and read_table(str(table)) == rows  # ... and nothing else evaluated


def test_the_table_reads_back_what_it_wrote_as_csv_or_json(tmp_path):
    rows = task_rows("run", "/runs/run/checkpoints/7", 7, "coco",
                     {"num_images": 5, "image_to_text": {"R@1": 0.25}, "per_class_accuracy": {"a": 1.0},
                      "dataset": "coco"})
    assert rows == [{"model": "run", "checkpoint": "/runs/run/checkpoints/7", "step": 7, "task": "coco",
                     "metric": metric, "value": value} for metric, value in (("num_images", 5.0),
                                                                             ("image_to_text/R@1", 0.25))]
    for name in ("table.csv", "table.json"):
        write_table(str(tmp_path / name), rows)
        assert read_table(str(tmp_path / name)) == rows
    (tmp_path / "other.csv").write_text("name,score\na,1\n")
    with pytest.raises(ValueError, match=r"other.csv is not a jclip results table \(its columns are \['name', "
                                         r"'score'\]"):
        read_table(str(tmp_path / "other.csv"))
