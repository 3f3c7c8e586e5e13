"""Host memory for CPU training: freed memory kept for reuse, and one computation's buffers at a time.

`prepare_host()` applies both settings below; every entry point calls it first.

glibc keeps freed memory instead of giving it back to the OS (`reuse_freed_memory`):

XLA's CPU client allocates a step's temporary buffers (2.3 GB for
`bench-small` at batch 128) as one block and frees it when the step ends;
glibc hands such a block back to the kernel, so the next step touches fresh
pages: 580,000 page faults and 1.2 s of kernel time per 3.5 s step on a
2-core machine. One malloc arena that is never trimmed and never serves
blocks with mmap makes the next step reuse the same pages: no faults, and the
step 15-20 % faster (`benchmarks/train_throughput.py`).

It must run before JAX starts its threads (a thread keeps the arena it first
allocated from), which is why the entry points call it before importing
anything else. It applies only where it helps and cannot hurt: glibc hosts
without GPUs or TPUs, whose host code allocates from many threads and whose
device memory is not malloc's. `JCLIP_HOST_MALLOC=default` turns it off.
"""

import ctypes
import ctypes.util
import glob
import os
import sys

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def has_accelerator() -> bool:
    """Whether this host has NVIDIA GPUs or TPUs (their device files), where JAX computes off the host."""
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def reuse_freed_memory() -> bool:
    """Make glibc keep and reuse freed memory (see the module docstring); True when applied."""
    if os.environ.get("JCLIP_HOST_MALLOC") == "default" or not sys.platform.startswith("linux") or has_accelerator():
        return False
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False  # not glibc (e.g. musl)
    # A trim threshold of -1 becomes SIZE_MAX in glibc: never trim.
    return all(libc.mallopt(parameter, value) == 1
               for parameter, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))


def synchronous_cpu_dispatch() -> bool:
    """Run each single-device CPU computation in the calling thread, done when the call returns; True when applied.

    XLA's CPU client allocates a computation's temporary buffers when the computation is queued, and frees them
    just after its outputs are ready. So a loop that queues the next step, even the moment the last one is done,
    holds two or three steps' buffers: `bench-small` at batch 128 peaked at 5.1 or 7.2 GB, not 3.0 GB. The host
    has nothing to overlap with a step that it computes itself. It must run before JAX makes its CPU client;
    not on hosts with accelerators, whose steps do not run on the CPU client.
    """
    if has_accelerator():
        return False
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def prepare_host() -> None:
    """`reuse_freed_memory` and `synchronous_cpu_dispatch`, before JAX starts."""
    reuse_freed_memory()
    synchronous_cpu_dispatch()
