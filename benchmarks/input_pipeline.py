"""Input pipeline throughput: 224 px JPEG decode + inception crop + flip + normalise + tokenize.

Generates its own JPEG image–caption pairs (varied sizes around 300 px), writes
them as WebDataset tar shards and as a tfds ArrayRecord dataset, and times
`jclip.data.pipeline.TrainInput` reading each, after a warm-up. It compares
against the training step of `--model` on this machine (forward, loss,
backward, AdamW at `--batch`), which the pipeline must outpace.

    python benchmarks/input_pipeline.py                 # a few minutes on 2 CPU cores
    python benchmarks/input_pipeline.py --images 4000 --batch 64
"""

import argparse
import io
import json
import os
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from jclip import parallel
from jclip.data import pipeline
from jclip.data.bpe_tokenizer import Tokenizer
from jclip.data.sources import tar_source, tfds_source
from jclip.data.to_tfds import convert
from timing import seconds_per_step

WORDS = ("a photo of the small red large blue dog cat tree house on in with next to under a bright sunny day "
         "of green old new car street city river mountain").split()


def write_tar_shards(directory: str, count: int, shards: int, rng: np.random.Generator) -> list[str]:
    """`count` JPEG–caption samples in `shards` tar files; returns the captions."""
    captions = []
    for shard in range(shards):
        with tarfile.open(os.path.join(directory, f"{shard:05d}.tar"), "w") as archive:
            for i in range(shard, count, shards):
                height, width = rng.integers(240, 400, size=2)
                pixels = (rng.random((height // 8, width // 8, 3)) * 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).resize((width, height), Image.BILINEAR).save(buffer, "JPEG", quality=90)
                caption = " ".join(rng.choice(WORDS, size=rng.integers(5, 20)))
                captions.append(caption)
                for suffix, data in ((".jpg", buffer.getvalue()), (".txt", caption.encode())):
                    info = tarfile.TarInfo(f"{i:08d}{suffix}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return captions


def images_per_second(source, tokenizer, batch: int, batches: int) -> float:
    stream = pipeline.TrainInput(
        [(source, 1.0)], tokenizer, parallel.make_mesh(), batch_size=batch, text_length=77, seed=0,
        shuffle_buffer=1000, image_preprocess="decode|inception_crop(224, 0.4)|flip_lr|clip_normalize",
    )
    next(stream)  # warm-up: graph building, first shuffle buffer
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch / (time.perf_counter() - start)


def train_step_images_per_second(model_name: str, batch: int, steps: int) -> float:
    """Pairs per second of the full train step of `model_name` at `batch` on this machine's devices."""
    import jax
    import ml_collections

    from jclip import models
    from jclip.train.optimizer import build_optimizer
    from jclip.train.state import create_train_state, state_layout
    from jclip.train.step import make_train_step

    model_kwargs = models.model_config(model_name)
    model = models.create(model_name)
    config = ml_collections.ConfigDict({"total_steps": 100, "optimizer": dict(
        learning_rate=1e-3, end_learning_rate=0.0, warmup_steps=10, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6,
        grad_clip_norm=1.0)})
    optimizer = build_optimizer(config)
    mesh = parallel.make_mesh()
    size = model_kwargs["vision"].get("image_size", 224)
    length = model_kwargs["text"]["context_length"]
    layout = state_layout(model, optimizer, (size, size, 3), length, mesh)
    state = create_train_state(layout, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch_arrays = parallel.global_batch({
        "image": rng.standard_normal((batch, size, size, 3)).astype(np.float32),
        "tokens": rng.integers(1, 1000, (batch, length)).astype(np.int32)}, mesh)
    return batch / seconds_per_step(make_train_step(layout), state, batch_arrays, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="generated image–caption pairs")
    parser.add_argument("--batch", type=int, default=64, help="batch size of pipeline and train step")
    parser.add_argument("--batches", type=int, default=20, help="timed pipeline batches per source")
    parser.add_argument("--model", default="ViT-B-32", help="model whose train step is the consumer")
    parser.add_argument("--steps", type=int, default=3, help="timed train steps")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as directory:
        captions = write_tar_shards(directory, args.images, shards=4, rng=rng)
        tokenizer = Tokenizer.train(captions, vocab_size=1000)
        tar = tar_source(os.path.join(directory, "*.tar"))
        array_record = tfds_source(convert(tar, "bench_pairs", os.path.join(directory, "tfds")), caption_key="captions")
        rows = {name: images_per_second(source, tokenizer, args.batch, args.batches)
                for name, source in (("tar shards", tar), ("tfds ArrayRecord", array_record))}
    consumer = train_step_images_per_second(args.model, args.batch, args.steps)

    print(f"\n{cores} cores; 224 px JPEG (240-400 px originals) decode + inception crop + flip + normalise, "
          f"77-token BPE, batch {args.batch}\n")
    print("| source | images/s | images/s per core | vs the train step |")
    print("|---|---:|---:|---:|")
    for name, rate in rows.items():
        print(f"| {name} | {rate:,.0f} | {rate / cores:,.0f} | {rate / consumer:.1f}× |")
    print(f"| {args.model} train step (consumer) | {consumer:,.1f} | | 1.0× |")
    print(json.dumps({"cores": cores, **{k.replace(' ', '_'): v for k, v in rows.items()},
                      "train_step_images_per_s": consumer}))


if __name__ == "__main__":
    main()
