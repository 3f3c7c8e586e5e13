"""The accelerator check: tests, throughput, loss memory and the demo recipe on this machine, in one JSON.

Meant for the rare machine with a GPU (or TPU) that is lent for a few minutes:
one command runs every check, each in its own process with its own time limit,
and writes `OUT/device_check.json` plus each stage's log under `OUT/logs/`. A
stage that fails, times out or cannot run on this machine is recorded as such
and the others still run; the whole check stays inside `--budget` seconds (a
stage is skipped when too little of it is left, and stopped at its end).

    benchmarks/device_check.sh                        # on the accelerator machine, about 4.5 minutes
    benchmarks/device_check.sh --tiny                 # on a CPU, about a minute: the suite's test of it

Stages, in order (the benchmarks first, on a quiet machine):

- env: CPU, accelerator, driver and package versions, and the error of a
  float32 matmul against float64 at JAX's default matmul precision and at
  "highest" (XLA may use TF32 for float32 matmuls on a GPU).
- throughput_bf16: benchmarks/train_throughput.py, ViT-B/16, bf16, against OpenCLIP, with MFU and the
  time of each stage (forward, backward, update).
- loss_memory: benchmarks/loss_memory.py up to a global batch of 65,536 on the
  accelerators this machine has (memory and forward+backward time).
- loss_tests, train_step_tests (on the accelerator, one device: the tests that
  need 2 or 8 devices are filtered out) and sharded_tests_cpu (the loss and
  train-step tests as the suite runs them: 8 simulated devices on the host's
  CPU), the three at once.
- loss_tests_highest: the accelerator's failed loss tests again with
  JAX_DEFAULT_MATMUL_PRECISION=highest, to tell TF32 rounding from real errors.
- demo: the demo recipe (configs/shapes_tiny.py) for 200 steps; skipped where
  tensorflow / tensorflow_datasets are not installed.
- throughput_fp32: as throughput_bf16 in float32, if time is left.

`--tiny` runs the same stages on a CPU with tiny models, batches and test selections.
"""

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from typing import Callable, NamedTuple, Optional

REPO = pathlib.Path(__file__).resolve().parents[1]
LOG_TAIL_CHARS = 1500
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch", "open_clip_torch",
            "tensorflow", "tensorflow-cpu", "tensorflow-datasets", "ml_collections")

# pytest arguments of the three test stages. On one accelerator the filters leave out the tests that
# need 2 or 8 devices (of tests/test_train_step.py only one test needs no more than one device).
LOSS_FILES = " ".join(f"tests/test_losses_{name}.py" for name in (
    "reference", "geometry", "hard_negatives", "multi_view", "soft_targets", "captioning"))
LOSS_TESTS = f"{LOSS_FILES} -k 'not sharded and not per_device and not global_token_count'"
TRAIN_STEP_TESTS = "tests/test_train_step.py -k objective_is_the_weighted_sum"
SHARDED_TESTS = f"tests/test_losses_sharded.py {LOSS_FILES} tests/test_train_step.py"
TINY_LOSS_TESTS = "tests/test_losses_reference.py -k 'initial_values or metrics_match_numpy'"
TINY_SHARDED_TESTS = "tests/test_losses_sharded.py -k metrics_per_device_equal_whole_batch"

TINY_DEMO_MODEL = ("--config.model_name=test-micro", "--config.model.vision.depth=1", "--config.model.text.depth=1",
                   "--config.model.vision.width=32", "--config.model.text.width=32",
                   "--config.model.vision.stem=patch", "--config.model.vision.num_heads=2",
                   "--config.model.text.num_heads=2", "--config.model.embed_dim=16")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one mode runs: models, batches, test selections, time limits (seconds)."""

    budget: float
    throughput: tuple  # train_throughput.py arguments shared by both precisions
    bf16_batch: int
    fp32_batch: Optional[int]  # None: no float32 row
    baseline: bool  # time OpenCLIP too
    loss_memory: tuple
    loss_tests: str
    train_step_tests: str
    sharded_tests: str
    accelerator_workers: int  # pytest-xdist processes sharing the accelerator; 0: none
    cpu_workers: int
    demo: tuple
    timeouts: dict


FULL = Settings(
    budget=270,
    throughput=("--model", "ViT-B-16", "--steps", "10", "--warmup", "3", "--stages"),
    bf16_batch=256,
    fp32_batch=128,
    baseline=True,
    loss_memory=("--batches", "4096,16384,65536", "--max-timed-batch", "65536"),
    loss_tests=LOSS_TESTS,
    train_step_tests=TRAIN_STEP_TESTS,
    sharded_tests=SHARDED_TESTS,
    accelerator_workers=6,
    cpu_workers=8,
    demo=("--config.total_steps=200",),
    timeouts=dict(env=60, throughput_bf16=150, loss_memory=60, loss_tests=110, train_step_tests=60,
                  sharded_tests_cpu=110, loss_tests_highest=45, demo=150, throughput_fp32=100),
)
TINY = Settings(
    budget=300,
    throughput=("--model", "test-micro", "--image-size", "32", "--steps", "2", "--warmup", "0", "--stages"),
    bf16_batch=4,
    fp32_batch=None,
    baseline=False,
    loss_memory=("--batches", "512", "--dim", "32", "--loss", "clip", "--repeats", "1", "--max-timed-batch", "512"),
    loss_tests=TINY_LOSS_TESTS,
    train_step_tests=TRAIN_STEP_TESTS,
    sharded_tests=TINY_SHARDED_TESTS,
    accelerator_workers=0,
    cpu_workers=0,
    demo=("--config.total_steps=3", "--config.log_every=1", "--config.batch_size=32",
          "--config.data.sources.shapes.config=tiny", "--config.data.tokenizer=shapes/tiny",
          "--config.evaluate.shapes_config=tiny", "--config.data.shuffle_buffer=512",
          "--config.evaluate.batch_size=64", *TINY_DEMO_MODEL),
    timeouts=dict(env=60, throughput_bf16=120, loss_memory=60, loss_tests=120, train_step_tests=120,
                  sharded_tests_cpu=120, loss_tests_highest=120, demo=150, throughput_fp32=120),
)


@dataclasses.dataclass
class Stage:
    """One command and how to read its results: `figures(log text)` -> numbers, `describe(figures)` -> one line."""

    name: str
    command: list
    env: dict
    figures: Callable[[str], dict]
    describe: Callable[[dict], str]
    skip: Optional[str] = None  # why it does not run here
    min_seconds: float = 15  # skipped when less of the budget is left


# ------------------------------------------------------------------ the env probe


def probe() -> dict:
    """This machine: CPU, accelerators, versions, and JAX's float32 matmul precision (run in its own process).

    Each part that imports a framework is guarded, so that a broken install still leaves the rest.
    """
    return {"python": platform.python_version(), "cpu": cpu_model(), "cpu_count": os.cpu_count(), "gpu": nvidia_smi(),
            "packages": {name: package_version(name) for name in PACKAGES}, "jax": guarded(jax_devices),
            "matmul_precision": guarded(matmul_precision_errors), "torch": guarded(torch_devices)}


def guarded(part: Callable[[], dict]) -> dict:
    try:
        return part()
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}


def jax_devices() -> dict:
    """JAX's default backend, its JAX_PLATFORMS name (cuda, rocm, tpu or cpu) and devices."""
    import jax

    name = "cpu"
    for candidate in ("cuda", "rocm", "tpu"):
        with contextlib.suppress(RuntimeError, ValueError):  # no such backend here
            if jax.devices(candidate):
                name = candidate
                break
    return {"backend": jax.default_backend(), "platform": name, "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind}


def torch_devices() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else None,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def nvidia_smi() -> Optional[list]:
    """[{"name", "driver", "memory"}] of each NVIDIA GPU, or None without nvidia-smi."""
    try:
        output = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                 "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [dict(zip(("name", "driver", "memory"), (cell.strip() for cell in line.split(","))))
            for line in output.splitlines() if line.strip()]


def package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def matmul_precision_errors(n: int = 512) -> dict:
    """Relative (Frobenius) error of a float32 n x n matmul against float64, at each matmul precision."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a, b = np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    errors = {"jax_default_matmul_precision": getattr(jax.config, "jax_default_matmul_precision", None)}
    for name in ("default", "highest"):
        with jax.default_matmul_precision(name) if name != "default" else contextlib.nullcontext():
            product = np.asarray(jax.jit(jnp.matmul)(a, b), np.float64)
        errors[name] = float(np.linalg.norm(product - exact) / np.linalg.norm(exact))
    return errors


# ------------------------------------------------------------------ reading results


def last_json_line(log: str) -> dict:
    """The JSON object a benchmark prints last."""
    for line in reversed(log.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def pytest_figures(junit_xml: pathlib.Path) -> dict:
    """Counts of passed / failed / error / skipped tests, and each failure's node id and first message line."""
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failures = []
    for case in ElementTree.parse(junit_xml).getroot().iter("testcase"):
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        kind = "passed" if outcome is None else {"failure": "failed"}.get(outcome.tag, outcome.tag)
        counts[kind] += 1
        if kind in ("failed", "error"):
            module, name = case.get("classname", ""), case.get("name", "")
            message = (outcome.get("message") or "").strip()
            failures.append({"test": f"{module.replace('.', '/')}.py::{name}" if module else name, "kind": kind,
                             "message": message.splitlines()[0][:300] if message else ""})
    return {**counts, "failures": failures}


def describe_tests(figures: dict) -> str:
    text = ", ".join(f"{figures[k]} {k}" for k in ("passed", "failed", "error", "skipped") if figures.get(k))
    return text or "no tests ran"


def throughput_figures(log: str) -> dict:
    result = last_json_line(log)
    rows = result.get("rows", {})
    figures = {key: result.get(key) for key in ("model", "precision", "batch", "device", "samples_per_s", "mfu",
                                                "median_step_s", "compile_s", "peak_memory_mib",
                                                "gflops_per_sample", "peak_gflops_per_s", "ratio_vs_open_clip")}
    if "open_clip" in rows:
        figures["open_clip"] = {key: rows["open_clip"].get(key)
                                for key in ("samples_per_s", "mfu", "peak_memory_mib", "torch", "open_clip")}
    figures["result"] = result
    return figures


def describe_throughput(figures: dict) -> str:
    text = f"jclip {figures['samples_per_s']:.1f} samples/s, MFU {figures['mfu']:.1%}"
    if figures.get("ratio_vs_open_clip"):
        text += f", {figures['ratio_vs_open_clip']:.2f}x OpenCLIP ({figures['open_clip']['samples_per_s']:.1f})"
    return text


def loss_memory_figures(log: str) -> dict:
    """The rows of loss_memory.py's Markdown table, as dicts with numbers."""
    keys = {"loss": "loss", "devices": "devices", "global batch": "batch", "variant": "variant",
            "temp MiB / device": "temp_mib", "fwd+bwd s": "fwd_bwd_s"}
    header, rows = None, []
    for line in log.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if header is None:
            header = cells
            continue
        rows.append({keys[name]: number(cell) for name, cell in zip(header, cells) if name in keys})
    return {"rows": rows}


def number(cell: str):
    """A table cell as an int or float where it is one ("1,024.5" too), None for "—", else the text."""
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(cell.replace(",", ""))
    return None if cell == "—" else cell


def describe_loss_memory(figures: dict) -> str:
    if not figures["rows"]:
        return "no rows"
    batch = max(row["batch"] for row in figures["rows"])
    return f"batch {batch}: " + ", ".join(
        f"{row['loss']} {row['variant']} {row['temp_mib']:,.1f} MiB"
        + (f" {row['fwd_bwd_s']:.3f} s" if row.get("fwd_bwd_s") is not None else "")
        for row in figures["rows"] if row["batch"] == batch)


def demo_figures(workdir: pathlib.Path) -> dict:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [(m["step"], m["loss"]) for m in lines if "loss" in m]
    speeds = [m["samples_per_second"] for m in lines if "samples_per_second" in m]
    results = workdir / "results.json"
    return {"steps": losses[-1][0], "first_loss": losses[0][1], "last_loss": losses[-1][1],
            "samples_per_s": speeds[-1] if speeds else None,
            "results": json.loads(results.read_text()) if results.exists() else None}


def describe_demo(figures: dict) -> str:
    return f"{figures['steps']} steps, loss {figures['first_loss']:.3f} -> {figures['last_loss']:.3f}"


# ------------------------------------------------------------------ running stages


class Job(NamedTuple):
    """A stage's running process."""

    stage: Stage
    process: subprocess.Popen
    started: float
    timeout: float
    log: pathlib.Path


class Runner:
    """Runs stages (a group of them at once), within the budget, and keeps the JSON up to date."""

    def __init__(self, out: pathlib.Path, settings: Settings, mode: str):
        self.out, self.logs, self.timeouts = out, out / "logs", settings.timeouts
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.deadline = self.start + settings.budget
        self.report = {"mode": mode, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                       "budget_s": settings.budget, "stages": {}}
        self.running: dict[str, Job] = {}

    def run(self, *stages: Stage) -> None:
        """Start the stages that fit in the budget, all at once, and wait for each to end or time out."""
        for stage in stages:
            left = self.deadline - time.monotonic()
            if stage.skip or left < stage.min_seconds:
                self.record(stage, {"status": "skipped",
                                    "reason": stage.skip or f"out of time: {max(left, 0):.0f} s of the budget left"})
                continue
            timeout = min(self.timeouts[stage.name], left)
            log = self.logs / f"{stage.name}.log"
            print(f"[{self.elapsed():4.0f} s] {stage.name} (limit {timeout:.0f} s): {shlex.join(stage.command)}",
                  flush=True)
            # jclip imports from this checkout, installed or not.
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))),
                   **stage.env}
            with open(log, "w") as stream:
                process = subprocess.Popen(stage.command, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT,
                                           start_new_session=True)
            self.running[stage.name] = Job(stage, process, time.monotonic(), timeout, log)
            self.report["stages"][stage.name] = {"status": "running"}  # the JSON keeps the stages in order
        while self.running:
            time.sleep(0.2)
            for job in list(self.running.values()):
                if job.process.poll() is not None:
                    self.end(job)
                elif time.monotonic() - job.started > job.timeout:
                    self.end(job, "timeout")

    def end(self, job: Job, stopped: Optional[str] = None) -> None:
        """Record a stage's outcome; `stopped` ("timeout", "interrupted"): stop it first."""
        if stopped:
            stop(job.process)
        del self.running[job.stage.name]
        text = job.log.read_text(errors="replace")
        returncode = job.process.returncode
        entry = {"status": stopped or ("ok" if returncode == 0 else "failed"),
                 "seconds": round(time.monotonic() - job.started, 1), "returncode": returncode,
                 "command": shlex.join(job.stage.command), "log": str(job.log.relative_to(self.out)),
                 "tail": text[-LOG_TAIL_CHARS:]}
        try:  # a stopped stage may still leave figures: pytest writes its report when interrupted
            entry["figures"] = job.stage.figures(text)
            entry["summary"] = job.stage.describe(entry["figures"])
        except Exception as error:  # a stage that died early leaves nothing to read: its status says so
            entry["figures_error"] = f"{type(error).__name__}: {error}"
        self.record(job.stage, entry)

    def record(self, stage: Stage, entry: dict) -> None:
        self.report["stages"][stage.name] = entry
        summary = entry.get("summary") or entry.get("reason") or entry.get("figures_error", "")
        seconds = f" in {entry['seconds']:.0f} s" if "seconds" in entry else ""
        print(f"[{self.elapsed():4.0f} s] {stage.name}: {entry['status']}{seconds}  {summary}", flush=True)
        self.write()

    def stop_all(self) -> None:
        for job in list(self.running.values()):
            self.end(job, "interrupted")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def write(self) -> None:
        self.report["seconds"] = round(self.elapsed(), 1)
        path = self.out / "device_check.json"
        path.with_suffix(".tmp").write_text(json.dumps(self.report, indent=1))
        path.with_suffix(".tmp").replace(path)


def stop(process: subprocess.Popen) -> None:
    """End a stage's process group (it runs in its own session): INT (pytest then writes its report), TERM, KILL."""
    for sig, wait in ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait)
            return


# ------------------------------------------------------------------ the stages


def python(*args: str) -> list:
    return [sys.executable, *args]


def env_stage() -> Stage:
    return Stage("env", python(__file__, "--probe"), {}, figures=last_json_line, describe=describe_env)


def describe_env(info: dict) -> str:
    gpu = ", ".join(f"{g['name']} (driver {g['driver']})" for g in info["gpu"] or []) or "no NVIDIA GPU"
    jax_info, precision = info["jax"], info["matmul_precision"]
    where = f"{jax_info['platform']} ({jax_info['device_kind']})" if "platform" in jax_info else jax_info["error"]
    errors = (f"{precision['default']:.1e} (default), {precision['highest']:.1e} (highest)" if "default" in precision
              else precision["error"])
    return (f"{info['cpu']} x{info['cpu_count']}; {gpu}; jax {info['packages']['jax']} on {where}; "
            f"torch {info['packages']['torch']}; float32 matmul error {errors}")


def accelerator_env(platform_name: Optional[str], tests: bool) -> dict:
    """The environment of a stage that runs on the accelerator the env probe found (cpu in --tiny)."""
    env = {}
    if platform_name:
        env["JAX_PLATFORMS"] = platform_name if platform_name == "cpu" else f"{platform_name},cpu"
    if tests:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # several test processes share the accelerator
        if platform_name == "cuda":  # tests/conftest.py hides GPUs unless this is set
            env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES") or "0"
    return env


def pytest_stage(name: str, selection: str, workers: int, env: dict, logs: pathlib.Path) -> Stage:
    junit = logs / f"{name}.xml"
    command = python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers), f"--junitxml={junit}",
                     *shlex.split(selection))
    return Stage(name, command, env, figures=lambda log: pytest_figures(junit), describe=describe_tests)


def rerun_at_highest_precision(tests: Optional[dict], env: dict, workers: int, logs: pathlib.Path) -> Stage:
    """The accelerator's failed loss tests again with float32 matmuls at full precision."""
    failed = [f["test"] for f in (tests or {}).get("figures", {}).get("failures", []) if f["kind"] == "failed"]
    stage = pytest_stage("loss_tests_highest", shlex.join(failed), workers,
                         {**env, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}, logs)
    if not failed:
        stage.skip = "no failed loss tests to run again"
    return stage


def throughput_stage(settings: Settings, precision: str, env: dict) -> Stage:
    batch = settings.bf16_batch if precision == "bf16" else settings.fp32_batch
    command = python("benchmarks/train_throughput.py", *settings.throughput, "--precision", precision,
                     "--batch", str(batch), *(("--baseline", "open_clip") if settings.baseline else ()))
    stage = Stage(f"throughput_{precision}", command, env, figures=throughput_figures, describe=describe_throughput,
                  min_seconds=settings.timeouts[f"throughput_{precision}"] * 0.8)  # too short is no use
    if batch is None:
        stage.skip = "this mode times one precision"
    return stage


def loss_memory_stage(settings: Settings, devices: int, env: dict) -> Stage:
    command = python("benchmarks/loss_memory.py", "--devices", str(devices), *settings.loss_memory)
    return Stage("loss_memory", command, env, figures=loss_memory_figures, describe=describe_loss_memory)


def demo_stage(settings: Settings, workdir: pathlib.Path, data_dir: Optional[str], env: dict) -> Stage:
    command = python("-m", "jclip.train", "--config", "configs/shapes_tiny.py", "--workdir", str(workdir),
                     *settings.demo, *((f"--config.data.data_dir={data_dir}",) if data_dir else ()))
    stage = Stage("demo", command, env, figures=lambda log: demo_figures(workdir), describe=describe_demo,
                  min_seconds=settings.timeouts["demo"] / 2)
    missing = [name for name in ("tensorflow", "tensorflow_datasets", "ml_collections")
               if importlib.util.find_spec(name) is None]
    if missing:
        stage.skip = f"not installed here: {', '.join(missing)}"
    return stage


# ------------------------------------------------------------------ main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models and selections, for a CPU (the test suite)")
    parser.add_argument("--out", default="runs/device_check", help="directory of device_check.json and logs/")
    parser.add_argument("--budget", type=float, help="seconds for all stages (default: 270, --tiny 300)")
    parser.add_argument("--data-dir", help="the demo's tfds data dir (default: jclip's)")
    parser.add_argument("--loss-tests", help="pytest arguments of loss_tests (one accelerator device)")
    parser.add_argument("--train-step-tests", help="pytest arguments of train_step_tests (one accelerator device)")
    parser.add_argument("--sharded-tests", help="pytest arguments of sharded_tests_cpu (8 simulated CPU devices)")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe()))
        return
    settings = TINY if args.tiny else FULL
    settings = dataclasses.replace(settings, **{key: value for key, value in (
        ("budget", args.budget), ("loss_tests", args.loss_tests), ("train_step_tests", args.train_step_tests),
        ("sharded_tests", args.sharded_tests)) if value is not None})
    out = pathlib.Path(args.out).resolve()
    runner = Runner(out, settings, "tiny" if args.tiny else "full")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # an outer `timeout`: stop the stages, keep the JSON
    try:
        run_all(runner, settings, out, args.data_dir)
    finally:
        runner.stop_all()
        runner.write()
    print_summary(runner.report)
    print(f"\nWritten to {out / 'device_check.json'}")


def run_all(runner: Runner, settings: Settings, out: pathlib.Path, data_dir: Optional[str]) -> None:
    runner.run(env_stage())
    machine = runner.report["stages"]["env"].get("figures", {})
    runner.report["machine"] = machine
    platform_name = machine.get("jax", {}).get("platform")
    benchmark_env, test_env = accelerator_env(platform_name, False), accelerator_env(platform_name, True)
    runner.run(throughput_stage(settings, "bf16", benchmark_env))
    devices = 8 if platform_name == "cpu" else len(machine.get("jax", {}).get("devices") or [None])  # 8: simulated
    runner.run(loss_memory_stage(settings, devices, benchmark_env))
    runner.run(pytest_stage("loss_tests", settings.loss_tests, settings.accelerator_workers, test_env, runner.logs),
               pytest_stage("train_step_tests", settings.train_step_tests, 0, test_env, runner.logs),
               pytest_stage("sharded_tests_cpu", settings.sharded_tests, settings.cpu_workers,
                            {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}, runner.logs))
    runner.run(rerun_at_highest_precision(runner.report["stages"].get("loss_tests"), test_env,
                                          settings.accelerator_workers, runner.logs))
    runner.run(demo_stage(settings, out / "demo", data_dir, benchmark_env))
    runner.run(throughput_stage(settings, "fp32", benchmark_env))


def print_summary(report: dict) -> None:
    print(f"\ndevice check ({report['mode']}), {report['seconds']:.0f} s of {report['budget_s']:.0f} s")
    for name, entry in report["stages"].items():
        seconds = f"{entry['seconds']:.0f} s" if "seconds" in entry else ""
        detail = entry.get("summary") or entry.get("reason") or entry.get("figures_error", "")
        print(f"  {name:<20}{entry['status']:<12}{seconds:>7}  {detail}")


if __name__ == "__main__":
    main()
