"""Hard kills, repeated: SIGKILL the trainer at random moments, restart it each time, and check that
the run ends exactly as an uninterrupted one (parameters, optimizer state, input position).

Each kill comes at one of three moments, drawn at random (each one at least once when there are three
kills or more): `step` (a random instant while steps run), `save` (while an asynchronous checkpoint
save is in flight: its temporary directory exists) and `evaluation` (after the metrics of a step that
evaluates, before its results are written). The trainer is `python -m jclip.train` on the demo config
shrunk to the `tiny` shapes data and the `test-micro` model, saving every step.

    python benchmarks/kill_soak.py --kills 10          # about 3 minutes on 2 CPU cores
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOMENTS = ("step", "save", "evaluation")
EVALUATE_EVERY = 4


CONFIG = """from jclip.cli import load_config_file


def get_config():
    config = load_config_file({demo!r})
    config.evaluate.tasks = dict(shapes=config.evaluate.tasks.shapes)  # one quick zero-shot task
    return config
"""


def train_command(root: str, workdir: str, data_dir: Optional[str], total_steps: int, killed: bool = True) -> list[str]:
    """The trainer's command line: the demo shrunk to seconds (its config file written into `root`); for the
    run to kill, a checkpoint every step and an evaluation every `EVALUATE_EVERY` steps, which change nothing
    in the training (the run never killed saves and evaluates at the end only)."""
    config = os.path.join(root, "soak_config.py")
    with open(config, "w") as f:
        f.write(CONFIG.format(demo=os.path.join(REPO, "configs", "shapes_tiny.py")))
    return [sys.executable, "-m", "jclip.train", "--config", config,
            "--workdir", workdir, "--config.data.sources.shapes.config=tiny", "--config.data.tokenizer=shapes/tiny",
            "--config.evaluate.shapes_config=tiny", "--config.model_name=test-micro", "--config.batch_size=32",
            "--config.data.shuffle_buffer=512", f"--config.total_steps={total_steps}",
            "--config.optimizer.warmup_steps=2", f"--config.checkpoint_every={1 if killed else total_steps}",
            "--config.keep_checkpoints=2", "--config.log_every=1",
            f"--config.evaluate.every_steps={EVALUATE_EVERY if killed else 0}",
            *([f"--config.data.data_dir={data_dir}"] if data_dir else [])]


def environment(cache: str) -> dict:
    """The trainer's environment: CPU, and a compilation cache shared by the restarts (they compile once)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def logged_steps(workdir: str, offset: int = 0) -> tuple[list[int], list[int]]:
    """(steps with training metrics, steps with evaluation results) in the run's metrics.jsonl after byte
    `offset` (what the current process wrote: a killed one's lines stay)."""
    train, evaluated = [], []
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            f.seek(offset)
            for line in f:
                if line.endswith("\n"):
                    record = json.loads(line)
                    (train if "loss" in record else evaluated).append(record["step"])
    except FileNotFoundError:
        pass
    return train, evaluated


def committed_steps(workdir: str) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []


def checkpoint_entries(workdir: str) -> set[str]:
    directory = os.path.join(workdir, "checkpoints")
    return set(os.listdir(directory)) if os.path.isdir(directory) else set()


class Moment:
    """Watches a restarted trainer's workdir for the moment to kill it, counting only what it writes itself
    (a killed run leaves metrics lines past its last checkpoint, and perhaps a save's temporary directory)."""

    def __init__(self, name: str, workdir: str, rng: random.Random):
        self.name, self.workdir, self.rng = name, workdir, rng
        path = os.path.join(workdir, "metrics.jsonl")
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0
        self.old_entries = checkpoint_entries(workdir)
        self.at: Optional[float] = None

    def reached(self) -> bool:
        if self.name == "save":
            return any("tmp" in name for name in checkpoint_entries(self.workdir) - self.old_entries)
        train, evaluated = logged_steps(self.workdir, self.offset)
        if self.name == "evaluation":
            return bool(train) and train[-1] % EVALUATE_EVERY == 0 and train[-1] not in evaluated
        if train and self.at is None:  # "step": a random instant once steps run
            self.at = time.monotonic() + self.rng.uniform(0.0, 0.3)
        return self.at is not None and time.monotonic() >= self.at


def kill_at(moment: str, workdir: str, command: list[str], env: dict, rng: random.Random,
            timeout: float) -> Optional[dict]:
    """Start the trainer and SIGKILL it at `moment`: what was logged then, or None if it finished first."""
    resumed = max(committed_steps(workdir), default=0)
    watch = Moment(moment, workdir, rng)
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    started = time.monotonic()
    deadline = started + timeout
    while not watch.reached():
        if process.poll() is not None:
            if process.returncode:
                raise RuntimeError(f"the trainer failed (exit {process.returncode}):\n{process.stderr.read()[-3000:]}")
            return None
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"no {moment!r} moment within {timeout:.0f} s")
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    return {"moment": moment, "seconds": time.monotonic() - started, "resumed_from": resumed,
            "logged_step": max(logged_steps(workdir, watch.offset)[0], default=resumed),
            "committed_after": max(committed_steps(workdir), default=0)}


def run_to_end(command: list[str], env: dict, timeout: float) -> None:
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if completed.returncode:
        raise RuntimeError(f"the trainer failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")


def final_state(workdir: str):
    """The run's last checkpoint: its state (params, optimizer state, step) as NumPy, and its record."""
    import jax

    from jclip import models, parallel
    from jclip.checkpoint import Checkpointer
    from jclip.train.loop import train_state_layout
    from jclip.train.optimizer import build_optimizer
    from ml_collections import ConfigDict

    with open(os.path.join(workdir, "config.json")) as f:
        config = ConfigDict(json.load(f))
    model = models.model_class(config.model)(**config.model)
    layout = train_state_layout(config, model, build_optimizer(config), parallel.make_mesh())
    checkpointer = Checkpointer(workdir, config.model.to_dict(), save_every=1)
    try:
        state, record = checkpointer.restore(layout.abstract)
    finally:
        checkpointer.close()
    return jax.device_get(state), record


def soak(root: str, kills: int, seed: int = 0, data_dir: Optional[str] = None, total_steps: Optional[int] = None,
         timeout: float = 300.0) -> dict:
    """Kill the trainer `kills` times at random moments, restart it to the end, and compare with a run never
    killed. Returns {"kills": [...], "equal": bool, "steps": total_steps}."""
    rng = random.Random(seed)
    moments = [MOMENTS[i % len(MOMENTS)] for i in range(kills)]
    rng.shuffle(moments)
    total_steps = total_steps or 3 * kills + 4
    env = environment(os.path.join(root, "compilation_cache"))
    killed, uninterrupted = os.path.join(root, "killed"), os.path.join(root, "uninterrupted")
    run_to_end(train_command(root, uninterrupted, data_dir, total_steps, killed=False), env, timeout)
    command = train_command(root, killed, data_dir, total_steps)
    report = []
    for moment in moments:
        kill = kill_at(moment, killed, command, env, rng, timeout)
        if kill is None:
            break
        report.append(kill)
    run_to_end(command, env, timeout)
    (state, record), (expected, expected_record) = final_state(killed), final_state(uninterrupted)
    import jax

    equal = (int(state.step) == int(expected.step) == total_steps
             and record["data_position"] == expected_record["data_position"]
             and all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                                                          jax.tree.leaves((expected.params, expected.opt_state)))))
    return {"kills": report, "equal": equal, "steps": total_steps}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=None, help="where the shapes data is (built there if missing)")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        result = soak(root, args.kills, args.seed, args.data_dir)
    print(f"\n{len(result['kills'])} SIGKILLs of a {result['steps']}-step run (checkpoint every step, evaluation "
          f"every {EVALUATE_EVERY}), in {time.perf_counter() - start:.0f} s\n")
    print("| kill | moment | seconds after the start | resumed from checkpoint | last logged step | "
          "newest checkpoint after the kill |")
    print("|---:|---|---:|---:|---:|---:|")
    for index, kill in enumerate(result["kills"], 1):
        print(f"| {index} | {kill['moment']} | {kill['seconds']:.1f} | {kill['resumed_from']} | {kill['logged_step']} | "
              f"{kill['committed_after']} |")
    print(f"\nFinal parameters, optimizer state and input position equal to the uninterrupted run's: {result['equal']}")
    sys.exit(0 if result["equal"] and len(result["kills"]) == args.kills else 1)


if __name__ == "__main__":
    main()
