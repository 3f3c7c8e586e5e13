"""Random image–token batches for train-step tests (NumPy only: cheap to import in worker processes)."""

import numpy as np


def random_batch(batch_size, image_size=32, length=16, vocab=256, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (batch_size, length)).astype(np.int32)
    tokens[:, rng.integers(4, length):] = 0  # padding after a random length
    return {"image": rng.uniform(-1, 1, (batch_size, image_size, image_size, 3)).astype(np.float32),
            "tokens": tokens}
