"""Command-line flags shared by `python -m jclip.train` and `python -m jclip.evaluate`.

`--config configs/NAME.py` selects an ml_collections config file and
`--config.KEY=VALUE` overrides any of its fields, the convention of the JAX
ecosystem. `--config.model_name=NAME` picks the model: `config.model` becomes
NAME's configuration, with the command line's `--config.model.*` overrides on
top. Bad flags stop with one line saying what is wrong.
"""

import importlib.util
import os
import pathlib
import sys
from typing import Any, Callable, Mapping, Sequence, Union

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported: no C++ INFO lines

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and results.json.")
flags.DEFINE_bool("multihost", False, "Join a multi-process job (jax.distributed); the cluster is detected "
                  "unless --coordinator_address, --num_processes and --process_id are given.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for --multihost launched by hand.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for --multihost launched by hand.")
flags.DEFINE_integer("process_id", None, "This process's index, for --multihost launched by hand.")


def load_config_file(path: Union[str, os.PathLike]) -> ConfigDict:
    """The `get_config()` of the config file at `path`, as `--config` loads it (without overrides)."""
    spec = importlib.util.spec_from_file_location(f"configs.{pathlib.Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl flag parsing, with config-override errors reduced to one readable line."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        message = str(error)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        message = str(error.args[0] if error.args else error).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    raise SystemExit(f"error: {message}\nRun with --helpfull for the flags; config fields are those of the --config file.")


def run_main(main: Callable[[list[str]], None]) -> None:
    """Run `main` under absl with jclip's flag parsing; library INFO logs (orbax, tfds) hidden."""
    app.call_after_init(lambda: logging.set_verbosity(logging.WARNING))
    app.run(main, flags_parser=parse_flags)


def require(name: str) -> None:
    if getattr(FLAGS, name) is None:
        sys.exit(f"error: --{name} is required")


def model_from_command_line(config: ConfigDict, overrides: Mapping[str, Any], config_file: str) -> None:
    """With another `model_name` among the command line's `overrides`, make `config.model` that model's
    configuration with the `model.*` overrides on top. A config file that customises its own model (fields of
    `config.model` other than its `model_name`'s) contradicts another name: that stops, naming the fields."""
    if "model_name" not in overrides:
        return
    from jclip import models

    written = load_config_file(config_file)
    if config.model_name == written.model_name:
        return  # the file's own model, its --config.model.* overrides already applied
    customised = [path for path, *_ in models.config_differences(written.model.to_dict(),
                                                                  models.model_config(written.model_name))]
    if customised:
        raise ValueError(
            f"{config_file} sets config.model_name={written.model_name!r} but customises config.model "
            f"({', '.join(customised)}); --config.model_name={config.model_name} would drop that: give those fields as "
            "--config.model.FIELD=VALUE, or pick the model in the file"
        )
    nested = {}
    for path, value in overrides.items():
        if path.startswith("model."):
            *parents, leaf = path.split(".")[1:]
            target = nested
            for key in parents:
                target = target.setdefault(key, {})
            target[leaf] = value
    with config.unlocked():
        config.model = ConfigDict(models.model_config(config.model_name, **nested))


def run_command(action: Callable[[ConfigDict, str], object], workdir_required: bool = True) -> None:
    """Run `action(config, workdir)` as a command: flags parsed, `--multihost` joined, bad input in one line."""

    def main(argv):
        del argv
        require("config")
        if workdir_required:
            require("workdir")
        join_multihost_job()
        try:
            model_from_command_line(FLAGS.config, config_flags.get_override_values(FLAGS["config"]),
                                    config_flags.get_config_filename(FLAGS["config"]))
            action(FLAGS.config, FLAGS.workdir)
        except (ValueError, OSError) as error:  # bad input, a missing or unreadable file, a failed save
            raise SystemExit(f"error: {error}")

    run_main(main)


def join_multihost_job() -> None:
    """`--multihost`: join the jax.distributed job before anything touches a device."""
    if FLAGS.multihost:
        from jclip import parallel

        parallel.initialize_multihost(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
