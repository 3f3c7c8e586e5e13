"""Checkpoints of a training run: orbax CheckpointManager with atomic, async saves.

A checkpoint holds the train state (params, optimizer state, step) and a small
JSON record: the model configuration (to refuse resuming another model) and
the input pipeline's position (for an exact resume). Orbax writes each step
into a temporary directory and renames it when complete, so a crash or kill
never leaves a half-written checkpoint where a resume would find it.
"""

import os
import time
from typing import Any, Callable, Optional

import orbax.checkpoint as ocp


class ModelMismatchError(ValueError):
    """The workdir holds a checkpoint of a different model."""


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [f"{prefix.rstrip('.')}: checkpoint has {saved!r}, config has {current!r}"]


class Checkpointer:
    """Saves and restores train states under `<workdir>/checkpoints/<step>`.

    `model` is the model's configuration (a JSON-compatible dict); a checkpoint
    saved with a different one is refused with `ModelMismatchError`. Saves are
    due every `save_every` steps; the last `keep` are kept, and also, for good,
    every checkpoint whose step is a multiple of `keep_period` (if set).
    """

    def __init__(self, workdir: str, model: dict, *, save_every: int, keep: int = 3,
                 keep_period: Optional[int] = None):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.model = model
        self.save_every = save_every
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=save_every, max_to_keep=keep, keep_period=keep_period or None, create=True,
                enable_async_checkpointing=True,
            ),
            item_names=("state", "record"),
        )
        self.last_save_time = time.monotonic()

    def minutes_since_save(self) -> float:
        """Minutes since the last save started (or since this checkpointer was made)."""
        return (time.monotonic() - self.last_save_time) / 60

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def _step_or_latest(self, step: Optional[int]) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step

    def due(self, step: int) -> bool:
        """Whether a save is due at `step` by the step interval (the same answer on every process)."""
        return step % self.save_every == 0

    def save(self, step: int, state: Any, record: Callable[[], dict], *, force: bool = False) -> bool:
        """Start saving `state` and `record()` at `step` if due (or `force`); returns whether it saves.

        `record` is called only when a save happens (it may need a collective across processes).
        """
        if not (force or self.due(step)):
            return False
        record = {**record(), "model": self.model, "step": step,
                  "has_ema_params": getattr(state, "ema_params", None) is not None}
        self.last_save_time = time.monotonic()
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)),
            force=True,  # the decision is ours (due / force); orbax's policies would add a save at the first step
        )

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
        """The state and record saved at `step` (default: latest), laid out like `abstract_state`."""
        step = self._step_or_latest(step)
        record = self.read_record(step)
        differences = _differences(record.get("model"), self.model)
        if differences:
            raise ModelMismatchError(
                f"{self.directory} holds a checkpoint (step {step}) of a different model: "
                + "; ".join(differences[:5])
                + ". Use a new --workdir, or the config the checkpoint was trained with."
            )
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored["state"], record

    def restore_params(self, abstract_params: Any, step: Optional[int] = None) -> tuple[Any, dict]:
        """Only the parameters to evaluate, from a checkpoint of any recipe (optimizer, EMA or not),
        laid out like `abstract_params`: the EMA of the parameters when the checkpoint has one, else the
        parameters. Returns them and the checkpoint's record; the model is not checked (see `read_record`)."""
        step = self._step_or_latest(step)
        record = self.read_record(step)
        key = "ema_params" if record.get("has_ema_params") else "params"
        target = {key: abstract_params}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                         partial_restore=True)))
        return restored["state"][key], record

    def read_record(self, step: Optional[int] = None) -> dict:
        """The JSON record saved with the checkpoint at `step` (default: latest): model config, data position."""
        step = self._step_or_latest(step)
        return self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
