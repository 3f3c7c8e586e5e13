"""Input pipeline throughput: 224 px JPEG decode + inception crop + flip + normalise + tokenize.

Generates its own JPEG image–caption pairs (varied sizes around 300 px), writes
them as WebDataset tar shards and as a tfds ArrayRecord dataset, and times
`jclip.data.pipeline.TrainInput` reading each, after a warm-up (its images
leave it as uint8; their normalisation runs in the train step). It compares
against the training step of `--model` on this machine (forward, loss,
backward, AdamW at `--batch`), which the pipeline must outpace, and with
`--baseline torchvision` against what OpenCLIP users run on the same JPEGs:
PIL decode, `RandomResizedCrop(224, scale=(0.4, 1))` (bicubic), flip,
`ToTensor` + `Normalize` and the same tokenizer per sample, in a torch
`DataLoader` with one worker process per core (and with one, for the rate per
core).

    python benchmarks/input_pipeline.py                 # a few minutes on 2 CPU cores
    python benchmarks/input_pipeline.py --images 4000 --batch 64 --baseline torchvision
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
from device_check import cpu_model
from timing import seconds_per_step

SPEC = "decode|inception_crop(224, 0.4)|flip_lr|clip_normalize"  # its normalisation runs in the train step
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


def read_tar_shards(directory: str) -> list[tuple[bytes, str]]:
    """The (JPEG, caption) samples of the shards `write_tar_shards` wrote."""
    samples = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(directory, name)) as archive:
                for member in archive:
                    key, suffix = os.path.splitext(member.name)
                    samples.setdefault(key, {})[suffix] = archive.extractfile(member).read()
    return [(files[".jpg"], files[".txt"].decode()) for _, files in sorted(samples.items())]


class TorchvisionPairs:
    """OpenCLIP's training transform of (JPEG, caption) pairs, as a torch map-style dataset."""

    def __init__(self, samples, tokenizer):
        import torchvision.transforms as transforms

        from jclip.data.preprocess import OPENAI_MEAN, OPENAI_STD

        self.samples, self.tokenizer = samples, tokenizer
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(OPENAI_MEAN, OPENAI_STD)])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        jpeg, caption = self.samples[index]
        image = self.transform(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        return image, self.tokenizer([caption], 77)[0]


def torchvision_images_per_second(samples, tokenizer, batch: int, batches: int, workers: int) -> float:
    """Images/s of `TorchvisionPairs` in a `DataLoader` of `workers` processes (one torch thread each)."""
    from jclip.convert.torch_import import import_open_clip

    torch, _ = import_open_clip()  # torchvision, also where its C extension does not load
    loader = torch.utils.data.DataLoader(
        TorchvisionPairs(samples, tokenizer), batch_size=batch, shuffle=True, num_workers=workers,
        persistent_workers=True, worker_init_fn=lambda _: torch.set_num_threads(1), prefetch_factor=4)
    while True:
        stream = iter(loader)
        next(stream)  # warm-up: workers started, first batches on their way
        start, count = time.perf_counter(), 0
        for _ in range(min(batches, len(loader) - 1)):
            next(stream)
            count += batch
        return count / (time.perf_counter() - start)


def images_per_second(source, tokenizer, batch: int, batches: int) -> float:
    with pipeline.TrainInput([(source, 1.0)], tokenizer, parallel.make_mesh(), batch_size=batch, text_length=77,
                             seed=0, shuffle_buffer=1000, image_preprocess=SPEC) as stream:
        next(stream)  # warm-up: graph building, first shuffle buffer
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        return batches * batch / (time.perf_counter() - start)


def train_step_images_per_second(model_name: str, batch: int, steps: int) -> float:
    """Pairs per second of the full train step of `model_name` at `batch` on this machine's devices, taking
    the pipeline's uint8 images and normalising them as training does."""
    import jax
    import ml_collections

    from jclip import models
    from jclip.data import preprocess
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
        "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        "tokens": rng.integers(1, 1000, (batch, length)).astype(np.int32)}, mesh)
    step = make_train_step(layout, image_op=preprocess.batch_op(SPEC))
    return batch / seconds_per_step(step, state, batch_arrays, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="generated image–caption pairs")
    parser.add_argument("--batch", type=int, default=64, help="batch size of pipeline and train step")
    parser.add_argument("--batches", type=int, default=20, help="timed pipeline batches per source")
    parser.add_argument("--model", default="ViT-B-32", help="model whose train step is the consumer")
    parser.add_argument("--steps", type=int, default=3, help="timed train steps")
    parser.add_argument("--baseline", choices=["torchvision"], default=None,
                        help="also time OpenCLIP's torchvision transform on the same images (torch extra)")
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
        baseline = {}
        if args.baseline:
            samples = read_tar_shards(directory)
            baseline = {f"torchvision, {workers} worker{'s' * (workers > 1)}": (torchvision_images_per_second(
                samples, tokenizer, args.batch, args.batches, workers), workers) for workers in sorted({1, cores})}
    consumer = train_step_images_per_second(args.model, args.batch, args.steps)

    print(f"\n{cores} cores; 224 px JPEG (240-400 px originals) decode + inception crop + flip + normalise, "
          f"77-token BPE, batch {args.batch}\n")
    per_core = max((rate / workers for rate, workers in baseline.values()), default=None)
    print(f"CPU: {cpu_model()}")
    print("| source | images/s | images/s per core | vs the train step |" + (" per core vs torchvision |" if baseline else ""))
    print("|---|---:|---:|---:|" + ("---:|" if baseline else ""))
    for name, (rate, used) in {**{k: (v, cores) for k, v in rows.items()}, **baseline}.items():
        ratio = f" {rate / used / per_core:.2f}× |" if baseline else ""
        print(f"| {name} | {rate:,.0f} | {rate / used:,.0f} | {rate / consumer:.1f}× |{ratio}")
    print(f"| {args.model} train step (consumer) | {consumer:,.1f} | | 1.0× |" + (" |" if baseline else ""))
    print(json.dumps({"cores": cores, "cpu": cpu_model(), **{k.replace(' ', '_'): v for k, v in rows.items()},
                      **{k: v for k, (v, _) in baseline.items()}, "train_step_images_per_s": consumer}))


if __name__ == "__main__":
    main()
