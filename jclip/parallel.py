"""The device mesh, the shardings of batches and parameters, and global batches.

jclip runs data-parallel over one mesh axis named `data` that spans every
device of every process. Per-device code uses `axis_name="data"` collectives
and runs under `jax.shard_map` inside `jax.jit`.
"""

from typing import Mapping, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_multihost(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                         process_id: Optional[int] = None) -> None:
    """Join a multi-process JAX job; call first thing in every process.

    With no arguments the cluster is detected (SLURM, TPU pods, and the other
    environments `jax.distributed.initialize` knows). On CPUs the processes
    talk over gloo collectives, as the tests do on loopback.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
    """A 1-D mesh over the first `num_devices` devices (default: all, all processes)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices}, but {len(devices)} devices are available")
        devices = devices[:num_devices]
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) dimension split over the `data` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "config.batch_size") -> None:
    """Raise a clear error unless `batch_size` splits evenly over devices and processes."""
    devices, processes = mesh.devices.size, jax.process_count()
    if batch_size % devices or batch_size % processes:
        raise ValueError(
            f"{what}={batch_size} is not divisible by the number of devices ({devices}) "
            f"and processes ({processes}); use a multiple of {np.lcm(devices, processes)}, "
            f"e.g. --{what}={max(1, batch_size // devices) * devices}"
        )


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of a batch (a dict of arrays, or of dicts of arrays: a NaFlex patch input) -> global
    arrays sharded over `data`."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, v), dict(local))


def process_zero_decides(flag: bool) -> bool:
    """Process 0's `flag`, on every process: for decisions that must agree, such as a time-based save."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.bool_(flag)))


def all_processes(flag: bool) -> bool:
    """Whether `flag` holds on every process (on every process)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.bool_(flag))))


def sync_processes(name: str) -> None:
    """Wait until every process reaches this point (`name` tells the barriers apart)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def gather_from_processes(local: np.ndarray) -> np.ndarray:
    """Every process's `local` rows, concatenated in process order, on every process.

    The processes may hold different numbers of rows (the same trailing shape and dtype).
    """
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local
    counts = multihost_utils.process_allgather(np.int32(len(local)))
    padded = np.zeros((int(counts.max()), *local.shape[1:]), local.dtype)
    padded[: len(local)] = local
    gathered = multihost_utils.process_allgather(padded)
    return np.concatenate([rows[:count] for rows, count in zip(gathered, counts)])


def gather_strings(local: list[str]) -> list[str]:
    """Every process's `local` strings, concatenated in process order, on every process."""
    if jax.process_count() == 1:
        return list(local)
    encoded = [s.encode("utf-8") for s in local]
    width = int(multihost_utils.process_allgather(np.int32(max(map(len, encoded), default=0))).max())
    rows = np.zeros((len(encoded), width + 1), np.uint8)  # +1: a string never fills its row, so no empty array
    for row, data in zip(rows, encoded):
        row[: len(data)] = np.frombuffer(data, np.uint8)
    return [bytes(row).rstrip(b"\0").decode("utf-8") for row in gather_from_processes(rows)]
