"""Checkpoints: saving, locating and restoring training runs and parameters-only checkpoints.

A run's checkpoint holds the train state (params, optimizer state, step) and a small JSON record:
the model configuration (to refuse resuming another model) and the input pipeline's position (for
an exact resume). A parameters-only checkpoint (converted weights, `save_parameters_only`) holds
`{"params": ...}` and a record marked `parameters_only`; a trainer starts from it with a fresh
optimizer, and evaluation reads it like any other. Orbax writes each step into a temporary
directory and renames it when complete, so a crash or kill never leaves a half-written checkpoint
where a resume would find it.

Loading a model's parameters from any checkpoint (`load_model`) lives here, so that evaluation, a
distillation teacher and the trainer share it.
"""

import json
import os
import pathlib
import time
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from jclip import models
from jclip.parameter_layout import abstract_params


class ModelMismatchError(ValueError):
    """The workdir holds a checkpoint of a different model."""


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

    def check_model(self, record: dict) -> None:
        """Refuse a checkpoint (its `record`) of a model other than this checkpointer's, naming the differences."""
        differences = models.architecture_differences(record.get("model"), self.model)
        if differences:
            raise ModelMismatchError(
                f"{self.directory} holds a checkpoint (step {record.get('step')}) of a different model: "
                + "; ".join(f"{path}: checkpoint has {saved!r}, config has {current!r}"
                            for path, saved, current in differences[:5])
                + ". Use a new --workdir, or the config the checkpoint was trained with."
            )

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
        """The state and record saved at `step` (default: latest), laid out like `abstract_state`."""
        step = self._step_or_latest(step)
        record = self.read_record(step)
        self.check_model(record)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored["state"], record

    def restore_params(self, target: Any, step: Optional[int] = None) -> tuple[Any, dict]:
        """Only the parameters to evaluate, from a checkpoint of any recipe (optimizer, EMA or not, or
        parameters only), laid out like `target` (abstract parameters): the EMA of the parameters when the
        checkpoint has one, else the parameters. Returns them and the checkpoint's record; the model is
        not checked (see `check_model`)."""
        step = self._step_or_latest(step)
        record = self.read_record(step)
        key = "ema_params" if record.get("has_ema_params") else "params"
        target = {key: target}
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


def save_parameters_only(params: Any, model_config: dict, output: str, record: dict) -> str:
    """Save `params` of the model `model_config` as a parameters-only checkpoint at step 0 of the run
    directory `output` (which must hold none yet), with `record`; returns the checkpoint's directory."""
    checkpointer = Checkpointer(output, model_config, save_every=1, keep=1)
    try:
        if checkpointer.latest_step() is not None:
            raise FileExistsError(f"{checkpointer.directory} already holds checkpoints; choose a new --output")
        checkpointer.save(0, {"params": params}, lambda: {**record, "parameters_only": True}, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
    return os.path.join(checkpointer.directory, "0")


def read_params(run_directory: str, target: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """`Checkpointer.restore_params` of a run's checkpoint, through a checkpointer of its own (orbax binds an
    item to the kind of its first save or restore, so a trainer's own checkpointer keeps to whole states)."""
    checkpointer = Checkpointer(run_directory, {}, save_every=1)
    try:
        return checkpointer.restore_params(target, step)
    finally:
        checkpointer.close()


def stored_parameter_shapes(run_directory: str, record: dict) -> Any:
    """The shapes and dtypes (`jax.ShapeDtypeStruct`s) of the parameters a run's checkpoint (its `record`)
    stores, its EMA when it keeps one, read from the checkpoint's metadata: nothing is loaded."""
    key = "ema_params" if record.get("has_ema_params") else "params"
    path = pathlib.Path(os.path.abspath(run_directory), "checkpoints", str(record["step"]), "state")
    stored = ocp.PyTreeCheckpointHandler().metadata(path).tree[key]
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), stored,
                        is_leaf=lambda leaf: hasattr(leaf, "shape"))


def read_stored_params(run_directory: str, step: Optional[int], sharding: Any) -> tuple[Any, dict]:
    """A run's checkpoint's parameters (its EMA when it keeps one) with the shapes they were stored with,
    whatever model and input shapes made them, each laid out with `sharding`; and the checkpoint's record."""
    record = read_record(run_directory, step)
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                          stored_parameter_shapes(run_directory, record))
    return read_params(run_directory, target, record["step"])


def run_config(run_directory: str, record: dict) -> ConfigDict:
    """The settings a checkpoint's model was made with (data shapes, tokenizer, preprocessing): the run's
    `config.json`, or for a converted checkpoint (`record`), the data settings its record holds."""
    path = os.path.join(run_directory, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return ConfigDict(json.load(f))
    if "data" not in record:
        raise ValueError(f"{run_directory} has no config.json and its checkpoint records no data settings; "
                         "use the run directory that jclip.train wrote, or convert the weights again")
    data = record["data"]
    return ConfigDict({"data": {**data, "data_dir": None}, "evaluate": {"preprocess": data["preprocess"]},
                       "model": record["model"], "model_name": record.get("model_name")})


def read_record(run_directory: str, step: Optional[int] = None) -> dict:
    """The JSON record of a run's checkpoint at `step` (default: latest): its model, step, data position."""
    if not os.path.isdir(os.path.join(run_directory, "checkpoints")):
        raise FileNotFoundError(f"no checkpoints in {run_directory}")
    checkpointer = Checkpointer(run_directory, {}, save_every=1)
    try:
        return checkpointer.read_record(step)
    finally:
        checkpointer.close()


def kept_steps(run_directory: str) -> list[int]:
    """The steps of a run's kept (committed) checkpoints, in order."""
    if not os.path.isdir(os.path.join(run_directory, "checkpoints")):
        raise FileNotFoundError(f"no checkpoints in {run_directory}")
    checkpointer = Checkpointer(run_directory, {}, save_every=1)
    try:
        return sorted(checkpointer.manager.all_steps())
    finally:
        checkpointer.close()


def locate(workdir: Optional[str], checkpoint: Optional[str], step: Optional[int]) -> tuple[str, Optional[int]]:
    """(run directory, step) of a checkpoint given as a run directory (`workdir`, its latest or `step`) or
    as a path (`checkpoint`: `RUN/checkpoints/STEP`, or a run directory)."""
    if checkpoint is None:
        if workdir is None:
            raise ValueError("give --workdir (its latest checkpoint) or --checkpoint PATH")
        return workdir, step
    checkpoint = os.path.abspath(checkpoint)
    if os.path.isdir(os.path.join(checkpoint, "checkpoints")):  # a run directory: its latest (or --step)
        return checkpoint, step
    parent = os.path.dirname(checkpoint)
    if not (os.path.isdir(checkpoint) and os.path.basename(parent) == "checkpoints"
            and os.path.basename(checkpoint).isdigit()):
        raise FileNotFoundError(f"no checkpoint at {checkpoint}: give a RUN/checkpoints/STEP directory "
                                "(as jclip.train and jclip.convert write) or a run directory")
    return os.path.dirname(parent), int(os.path.basename(checkpoint))


def load_model(config: ConfigDict, run_directory: str, step: Optional[int], mesh, tokenizer, *,
               verbose: bool = True) -> tuple[Any, Any, dict]:
    """(model, params, record) of a run's checkpoint (default: latest): the model the checkpoint records,
    its EMA parameters when it has them, laid out for `config.parameter_sharding` over `mesh`.

    The config supplies the data shapes (image size, text length), which the parameters must fit, and
    the tokenizer (if any) must not have more tokens than the model.
    """
    record = read_record(run_directory, step)
    model_config = ConfigDict(record["model"])
    if verbose and config.get("model") is not None and model_config.to_dict() != config.model.to_dict():
        print(f"Using the checkpoint's own model ({record['model']}), not config.model.")
    model = models.model_class(model_config)(**model_config)
    if tokenizer is not None and tokenizer.vocab_size > model_config.text.vocab_size:
        raise ValueError(f"the tokenizer {config.data.tokenizer!r} has {tokenizer.vocab_size} tokens, more than "
                         f"the checkpoint's model ({model_config.text.vocab_size}); set config.data.tokenizer to "
                         "its own")
    image_shape = (config.data.image_size, config.data.image_size, 3)
    target = abstract_params(model, config.get("parameter_sharding", "replicated"), mesh, image_shape,
                             config.data.text_length)
    try:
        params, record = read_params(run_directory, target, step)
    except ValueError as error:
        raise ValueError(f"the checkpoint's parameters do not fit config.data.image_size={config.data.image_size}"
                         f" and text_length={config.data.text_length} ({str(error).splitlines()[0]})") from None
    return model, params, record
