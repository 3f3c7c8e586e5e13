"""The training loop's own overhead: data wait, logging and checkpoint triggers, against the bare step.

Runs the demo recipe (`configs/shapes_tiny.py`) on this machine in two ways:

- step alone and step with input, in alternating blocks of `--block` steps,
  half of them before the loop and half after (so that the machine's drift in
  speed falls on all three alike): the jitted train step on `--block`
  batches already on the device, and the same step fed by the recipe's input
  pipeline one batch per step, as the loop feeds it;
- loop: `jclip.train.loop.train` for warm-up + `--steps` steps, with the
  input pipeline, logging every `log_every` steps, checkpoint triggers and
  progress bar; its time per step comes from the wall clock the loop writes
  to metrics.jsonl at two log points, so compilation, the first batches and
  the final checkpoint are not in it. The default 400 steps cross the end of
  the first epoch (step 390), where the data is reshuffled, and a checkpoint
  (step 250).

The overheads are (step with input) / (step alone) - 1 and loop / (step
alone) - 1; the goal is under 5 %.

    python benchmarks/loop_overhead.py                 # about 5 minutes on 2 CPU cores
"""

from jclip.host_memory import prepare_host

prepare_host()  # as the entry points do, before JAX starts its threads

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jclip import models, parallel  # noqa: E402
from jclip.cli import load_config_file  # noqa: E402
from jclip.data import pipeline  # noqa: E402
from jclip.data.sources import build_source  # noqa: E402
from jclip.data.tokenizers import load_tokenizer  # noqa: E402
from jclip.train.loop import config_train_step, train, train_state_layout  # noqa: E402
from jclip.train.optimizer import build_optimizer  # noqa: E402
from jclip.train.state import create_train_state  # noqa: E402


def demo_config():
    return load_config_file(pathlib.Path(__file__).resolve().parents[1] / "configs" / "shapes_tiny.py")


def step_timer(config, resident_batches: int):
    """`time(steps, fed)`: seconds per step of the recipe's jitted train step over `steps` steps, fed by the
    recipe's input pipeline one batch per step (`fed`) or cycling through `resident_batches` batches already
    on the device; warmed up.

    Distinct resident batches, not one: a step on the batch of the step before finds its inputs in the CPU's
    caches, which makes it 3 % faster than any step of training (measured), a baseline too good to be fair.
    """
    mesh = parallel.make_mesh()
    sources = [build_source(options, config.data.data_dir) for options in config.data.sources.values()]
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.data_dir)
    batches = pipeline.TrainInput(sources, tokenizer, mesh, batch_size=config.batch_size,
                                  text_length=config.data.text_length, seed=config.seed,
                                  shuffle_buffer=config.data.shuffle_buffer, image_preprocess=config.data.preprocess)
    resident = [next(batches) for _ in range(resident_batches)]
    model = models.model_class(config.model)(**config.model)
    optimizer = build_optimizer(config)
    layout = train_state_layout(config, model, optimizer, mesh)
    state = create_train_state(layout, jax.random.key(0))
    step = config_train_step(config, layout)

    def time_steps(steps: int, fed: bool) -> float:
        nonlocal state
        start = time.perf_counter()
        for index in range(steps):
            state, metrics = step(state, next(batches) if fed else resident[index % len(resident)])
        jax.block_until_ready(metrics)
        return (time.perf_counter() - start) / steps

    time_steps(3, fed=True)  # compile, warm up
    return time_steps


def alternating_blocks(time_steps, blocks: int, block: int) -> dict[str, list[float]]:
    """Seconds per step of `blocks` blocks of `block` steps alone, each followed by a block with input."""
    seconds = {"alone": [], "with input": []}
    for _ in range(blocks):
        for kind, times in seconds.items():
            times.append(time_steps(block, fed=kind == "with input"))
    return seconds


def loop_step_seconds(config, steps: int, workdir: str) -> float:
    """Seconds per step of `train` between its log points at `log_every` and `log_every + steps`."""
    config.total_steps = config.log_every + steps
    train(config, workdir, evaluate_at_end=False)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        seconds = {record["step"]: record["seconds"] for record in map(json.loads, f) if "seconds" in record}
    return (seconds[config.log_every + steps] - seconds[config.log_every]) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="timed loop steps (a multiple of the recipe's log_every)")
    parser.add_argument("--blocks", type=int, default=8,
                        help="alternating blocks of the step alone and with input, half before the loop, half after")
    parser.add_argument("--block", type=int, default=25, help="steps per block")
    args = parser.parse_args()
    config = demo_config()
    if args.steps % config.log_every:
        raise SystemExit(f"--steps must be a multiple of log_every={config.log_every}")
    time_steps = step_timer(config, resident_batches=args.block)
    before = alternating_blocks(time_steps, args.blocks // 2, args.block)
    with tempfile.TemporaryDirectory() as workdir:
        loop = loop_step_seconds(config, args.steps, workdir)
    after = alternating_blocks(time_steps, args.blocks - args.blocks // 2, args.block)
    alone, with_input = (float(np.median(before[kind] + after[kind])) for kind in ("alone", "with input"))
    print(f"\nshapes_tiny recipe, batch {config.batch_size}, {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s), log every {config.log_every} steps; {args.blocks} x {args.block} steps alone and with "
          f"input, alternating, half before and half after {args.steps} loop steps")
    print(f"{'':<26}{'s/step':>10}{'samples/s':>12}{'overhead':>10}")
    for name, seconds in (("train step alone", alone), ("train step with input", with_input),
                          ("training loop", loop)):
        print(f"{name:<26}{seconds:>10.4f}{config.batch_size / seconds:>12.1f}{seconds / alone - 1:>10.1%}")
    print("goal: loop overhead under 5 %")
    print(json.dumps({"bare_step_s": alone, "step_with_input_s": with_input, "loop_step_s": loop,
                      "input_overhead": with_input / alone - 1, "overhead": loop / alone - 1}))


if __name__ == "__main__":
    main()
