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

import contextlib
import gc
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from jclip import models, parallel
from jclip.parameter_layout import abstract_params


class ModelMismatchError(ValueError):
    """The workdir holds a checkpoint of a different model."""


class UnreadableCheckpointError(ValueError):
    """A checkpoint's files cannot be read: truncated or missing data, a torn record (a full disk, a bad copy,
    a storage fault). `reason` says why, in one line."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (a full disk, lost storage); the ones before it are intact."""


DAMAGED_DIRECTORY = "damaged_checkpoints"  # beside checkpoints/: where resuming moves unreadable checkpoints


def failure_reason(error: BaseException) -> str:
    """The innermost cause of `error`, on one line: what a person needs of a 100-line TensorStore error."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines() or [type(error).__name__]
    reason = lines[0]
    return reason if len(reason) <= 300 else reason[:297] + "..."


class _HeldStderr:
    dropped = False

    def drop(self) -> None:
        self.dropped = True


def _orbax_coroutine(unraisable) -> bool:
    return "orbax" in getattr(getattr(unraisable.object, "cr_code", None), "co_filename", "")


def _ignore_abandoned_orbax_reads() -> None:
    """From now on, drop the complaints of orbax's read coroutines abandoned at a failed read, which come
    whenever they are garbage collected."""
    previous = sys.unraisablehook
    if getattr(previous, "ignores_orbax_reads", False):
        return
    warnings.filterwarnings("ignore", r"coroutine '_read_array_index_and_device_put' was never awaited", RuntimeWarning)

    def hook(unraisable):
        if not _orbax_coroutine(unraisable):
            previous(unraisable)
    hook.ignores_orbax_reads = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def _held_stderr():
    """Hold back what is written to stderr (file descriptor 2) in the block, and write it out after, unless
    `drop()` was called: then the block's leftovers get a moment to finish (threads of abandoned reads print
    tracebacks as they do) and their complaints are dropped with the rest."""
    held, saved = _HeldStderr(), os.dup(2)
    sys.stderr.flush()
    with tempfile.TemporaryFile("w+") as text:
        os.dup2(text.fileno(), 2)
        try:
            yield held
        finally:
            if held.dropped:
                _ignore_abandoned_orbax_reads()
                gc.collect()
                time.sleep(0.2)
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not held.dropped:
                text.seek(0)
                sys.stderr.write(text.read())


class Checkpointer:
    """Saves and restores train states under `<workdir>/checkpoints/<step>`.

    `model` is the model's configuration (a JSON-compatible dict); a checkpoint
    saved with a different one is refused with `ModelMismatchError`. Saves are
    due every `save_every` steps; the last `keep` are kept, and also, for good,
    every checkpoint whose step is a multiple of `keep_period` (if set).

    A save that fails (in the background: it shows at the next save or `wait`)
    raises `CheckpointSaveError`, its partial files removed; with
    `retry_failed_saves`, a failure found at the next save is reported and that
    save goes ahead.
    """

    def __init__(self, workdir: str, model: dict, *, save_every: int, keep: int = 3,
                 keep_period: Optional[int] = None, retry_failed_saves: bool = False):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.model = model
        self.save_every = save_every
        self.retry_failed_saves = retry_failed_saves
        self._saving: Optional[int] = None  # the step of the save in flight
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
        try:
            self.wait()
        except CheckpointSaveError as failure:
            if not self.retry_failed_saves:
                raise
            print(f"warning: {failure}", flush=True)
        record = {**record(), "model": self.model, "step": step,
                  "has_ema_params": getattr(state, "ema_params", None) is not None}
        self.last_save_time = time.monotonic()
        self._saving = step
        with self._save_failures():
            return self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)),
                force=True,  # the decision is ours (due / force); orbax's policies would add a save at the first step
            )

    @contextlib.contextmanager
    def _save_failures(self):
        """A failure of the save in flight as a `CheckpointSaveError`, its partial files removed."""
        try:
            yield
        except Exception as error:
            step, self._saving = self._saving, None
            if jax.process_index() == 0:
                for partial in pathlib.Path(self.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
                    shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointSaveError(
                f"saving checkpoint {step} in {self.directory} failed: {failure_reason(error)}. The checkpoint of "
                f"step {self.manager.latest_step()} is intact: free space (or mend the storage) and re-run to resume "
                "from it; config.checkpoint_failure='retry' trains on and tries again at the next save") from error

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
        with self._unreadable(step):
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        return restored["state"], record

    def newest_readable(self, read: Callable[[int], Any], *, strict: bool = False) -> Any:
        """`read(step)` of the newest checkpoint it succeeds on (on every process), for resuming.

        A checkpoint that cannot be read is reported in one line; unless `strict`, the one before it is
        tried. Once one is read, the unreadable ones newer than it are moved (never deleted) to
        `<workdir>/damaged_checkpoints`, so that the run saves those steps anew. A checkpoint of another
        model stops at once (`ModelMismatchError`): that is the config's fault, not the files'.
        """
        failed = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                result, reason = read(step), None
            except ModelMismatchError:
                raise
            except UnreadableCheckpointError as error:
                result, reason = None, error.reason
            except Exception as error:  # orbax and TensorStore raise bare Exceptions
                result, reason = None, failure_reason(error)
            if parallel.all_processes(reason is None):
                if failed:
                    self._move_aside(failed, step)
                return result
            reason = reason or "another process could not read it"
            print(f"warning: checkpoint {self.directory}/{step} cannot be read: {reason}", flush=True)
            failed.append(step)
            if strict:
                raise UnreadableCheckpointError(
                    f"checkpoint {self.directory}/{step} cannot be read ({reason}) and config.resume_strict is set; "
                    f"move it out of {self.directory} to resume from the one before it, or set "
                    "--config.resume_strict=False to do that automatically") from None
        raise UnreadableCheckpointError(
            f"none of the {len(failed)} checkpoints in {self.directory} can be read (see the warnings above); "
            "to start over, move that directory away or use a new --workdir")

    def _move_aside(self, steps: list[int], resumed: int) -> None:
        """Move the unreadable checkpoints `steps` to `damaged_checkpoints/` (process 0; every process waits)."""
        damaged = os.path.join(os.path.dirname(self.directory), DAMAGED_DIRECTORY)
        if jax.process_index() == 0:
            os.makedirs(damaged, exist_ok=True)
            for step in steps:
                target = os.path.join(damaged, str(step))
                if os.path.exists(target):
                    target += f".{int(time.time())}"
                os.replace(os.path.join(self.directory, str(step)), target)
            print(f"Moved the unreadable checkpoint(s) {', '.join(map(str, steps))} to {damaged} (delete them when you "
                  f"no longer need them); step {resumed} is the newest readable one.", flush=True)
        parallel.sync_processes("jclip: damaged checkpoints moved aside")
        self.manager.reload()

    @contextlib.contextmanager
    def _unreadable(self, step: int):
        """Errors of reading checkpoint `step`'s files as one `UnreadableCheckpointError` naming it and the
        reason (shape and structure errors, which are the caller's, stay as they are). The reads orbax
        abandons at the error print hundreds of lines of tracebacks as they finish: those are dropped."""
        with _held_stderr() as held:
            try:
                yield
                return
            except json.JSONDecodeError as error:  # a torn metadata file
                reason = failure_reason(error)
            except (ValueError, TypeError, KeyError):
                raise
            except Exception as error:  # TensorStore's errors are bare Exceptions
                reason = failure_reason(error)
            held.drop()
        raise UnreadableCheckpointError(f"checkpoint {self.directory}/{step} cannot be read: {reason}", reason)

    def restore_params(self, target: Any, step: Optional[int] = None) -> tuple[Any, dict]:
        """Only the parameters to evaluate, from a checkpoint of any recipe (optimizer, EMA or not, or
        parameters only), laid out like `target` (abstract parameters): the EMA of the parameters when the
        checkpoint has one, else the parameters. Returns them and the checkpoint's record; the model is
        not checked (see `check_model`)."""
        step = self._step_or_latest(step)
        record = self.read_record(step)
        key = "ema_params" if record.get("has_ema_params") else "params"
        target = {key: target}
        with self._unreadable(step):
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                             restore_args=ocp.checkpoint_utils.construct_restore_args(target))))
        return restored["state"][key], record

    def read_record(self, step: Optional[int] = None) -> dict:
        """The JSON record saved with the checkpoint at `step` (default: latest): model config, data position."""
        step = self._step_or_latest(step)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
        except Exception as error:
            reason = failure_reason(error)
            raise UnreadableCheckpointError(f"the record of checkpoint {self.directory}/{step} cannot be read: "
                                            f"{reason}", reason) from None

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed (`CheckpointSaveError` if one failed)."""
        with self._save_failures():
            self.manager.wait_until_finished()
        self._saving = None

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
    except UnreadableCheckpointError:
        raise
    except ValueError as error:
        raise ValueError(f"the checkpoint's parameters do not fit config.data.image_size={config.data.image_size}"
                         f" and text_length={config.data.text_length} ({str(error).splitlines()[0]})") from None
    return model, params, record
