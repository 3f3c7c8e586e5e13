"""Peak memory and time of image–text Recall@K: tiled (`retrieval_recalls`) against the dense matrix.

Both compute image→text and text→image Recall@1/5/10 of random normalised embeddings, five captions
per image, noisy enough for COCO-like recalls. The dense version is what `retrieval_task` did: the
[images, captions] similarity and relevance matrices and `recall_at_k`'s argsort of each; it runs up to
`--dense-up-to` images. Memory is tracemalloc's peak above the embeddings: every NumPy array, not
OpenBLAS's own fixed buffers (RSS could not be reset between sizes in one process, and counts the
interpreter and libraries). Time is the same run's wall time (tracemalloc adds no measurable time here).

    python benchmarks/retrieval_memory.py             # about a minute on 2 CPU cores
    python benchmarks/retrieval_memory.py --sizes 1000x5000,2000x10000 --dim 256
"""

import argparse
import os
import time
import tracemalloc

import numpy as np

from device_check import cpu_model
from jclip.evaluate.retrieval import recall_at_k, retrieval_recalls

KS = (1, 5, 10)


def dense_recalls(images, texts, owner, ks):
    """`retrieval_task`'s dense computation (every image has a caption here)."""
    relevant = owner[None, :] == np.arange(len(images))[:, None]
    similarity = images @ texts.T
    return {"image_to_text": recall_at_k(similarity, relevant, ks),
            "text_to_image": recall_at_k(similarity.T, relevant.T, ks)}


def peak_and_time(fn, *args):
    """(result, peak bytes allocated while `fn` ran above what was allocated before, seconds)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    return result, peak, seconds


def embeddings(num_images, num_captions, dim, seed=0):
    rng = np.random.default_rng(seed)
    normalise = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    images = normalise(rng.normal(size=(num_images, dim)))
    owner = np.arange(num_captions) * num_images // num_captions
    texts = normalise(images[owner] + 7 * rng.normal(size=(num_captions, dim)) / np.sqrt(dim))
    return images, texts, owner


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1250x6250,2500x12500,5000x25000,10000x50000",
                        help="comma-separated IMAGESxCAPTIONS")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dense-up-to", type=int, default=5000, help="largest number of images run densely")
    args = parser.parse_args()

    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), NumPy {np.__version__}, embedding dim {args.dim}")
    print("| images × captions | R@1 i→t / t→i | embeddings (MiB) | tiled peak (MiB) | tiled (s) "
          "| dense peak (MiB) | dense (s) | dense / tiled memory | equal |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for size in args.sizes.split(","):
        num_images, num_captions = map(int, size.split("x"))
        images, texts, owner = embeddings(num_images, num_captions, args.dim)
        inputs = (images.nbytes + texts.nbytes + owner.nbytes) / 2**20
        tiled, tiled_peak, tiled_seconds = peak_and_time(retrieval_recalls, images, texts, owner, KS)
        dense_cells = ["", "", "", ""]
        if num_images <= args.dense_up_to:
            dense, dense_peak, dense_seconds = peak_and_time(dense_recalls, images, texts, owner, KS)
            dense_cells = [f"{dense_peak / 2**20:,.0f}", f"{dense_seconds:.1f}", f"{dense_peak / tiled_peak:.1f}×",
                           "yes" if dense == tiled else "NO"]
        recall = f"{tiled['image_to_text'][1]:.2f} / {tiled['text_to_image'][1]:.2f}"
        print(f"| {num_images:,} × {num_captions:,} | {recall} | {inputs:,.0f} | {tiled_peak / 2**20:,.0f} | "
              f"{tiled_seconds:.1f} | " + " | ".join(dense_cells) + " |", flush=True)


if __name__ == "__main__":
    main()
