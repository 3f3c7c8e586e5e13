"""Training-step throughput and MFU of jclip, side by side with OpenCLIP.

Times the full training step (forward, CLIP loss, backward, AdamW update)
after warm-up and prints a table: samples/s, median step time, model GFLOPs
per sample, achieved GFLOP/s, MFU against the matmul peak this script measures
on the device at that precision, and peak memory. The last line is one JSON
object with the figures.

    python benchmarks/train_throughput.py --model bench-small --batch 128 --precision fp32 --baseline open_clip
    python benchmarks/train_throughput.py --precision bf16 --baseline open_clip
    python benchmarks/train_throughput.py --batch 16 --scaling 1,2,4,8    # fixed per-device batch
    python benchmarks/train_throughput.py --variant onednn:xla_flags=--xla_cpu_use_onednn=true \
        --variant avx512:xla_flags=--xla_cpu_prefer_vector_width=512 --baseline open_clip
    python benchmarks/train_throughput.py --baseline open_clip --stages   # where a slower step loses its time

Each measurement runs in its own process, so JAX and PyTorch never share
thread pools and each one's memory is its own. `--baseline open_clip` builds
the same architecture with OpenCLIP (the optional torch extra), the same
batch, loss and AdamW, at the same precision: float32, or `torch.autocast`
bfloat16 for `bf16`. jclip's `bf16` is the model's `matmul_dtype="bfloat16"`:
bfloat16 matmul inputs with float32 accumulation, everything else float32, the
policy `torch.autocast` applies. With `--scaling` the devices are simulated
CPU devices unless the machine has that many accelerators.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MATMUL_SIZE = {"cpu": 2048, "gpu": 8192, "tpu": 8192}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-small", help="a name from jclip.models.list_models()")
    parser.add_argument("--batch", type=int, default=128, help="global batch (per device with --scaling)")
    parser.add_argument("--image-size", type=int,
                        help="image side in pixels (default: the model's; needed for models sized by their data, "
                             "such as test-micro)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after warm-up; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--baseline", choices=("open_clip",), help="also time OpenCLIP's model of the same shape")
    parser.add_argument("--scaling", help="device counts, e.g. 1,2,4,8: the batch is per device")
    parser.add_argument("--variant", action="append", default=[],
                        help="extra jclip rows, NAME:KEY=VALUE,... of model options (e.g. remat:remat=True), "
                             "or host_malloc=default (glibc's default allocator settings), or NAME:xla_flags=FLAGS "
                             "(XLA flags for that row alone, e.g. onednn:xla_flags=--xla_cpu_use_onednn=true); "
                             "repeatable")
    parser.add_argument("--stages", action="store_true",
                        help="also time the forward pass (with the loss) and forward + backward alone, and print "
                             "each stage's time beside OpenCLIP's: backward = the difference, the optimizer update "
                             "= the step less forward + backward")
    parser.add_argument("--worker", choices=("jclip", "open_clip"), help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--options", default="", help=argparse.SUPPRESS)
    parser.add_argument("--flops-per-sample", type=float, default=0.0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def parse_options(text: str) -> dict:
    """"remat=True,dtype=bfloat16" -> {"remat": True, "dtype": "bfloat16"}."""
    options = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value.lower() if value in ("True", "False") else value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def peak_memory_mib() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarize_times(times: list[float], batch: int, flops_per_sample: float, peak_flops: float) -> dict:
    step = statistics.median(times)
    achieved = batch * flops_per_sample / step
    return {"samples_per_s": batch / step, "median_step_s": step, "gflops_per_sample": flops_per_sample / 1e9,
            "achieved_gflops_per_s": achieved / 1e9, "peak_gflops_per_s": peak_flops / 1e9,
            "mfu": achieved / peak_flops}


# ---------------------------------------------------------------- jclip worker


def jclip_worker(args) -> dict:
    options = parse_options(args.options)
    import jax
    import numpy as np
    import optax

    from jclip import models, parallel
    from jclip.models.summary import training_flops_per_pair
    from jclip.train.state import create_train_state, state_layout
    from jclip.train.step import make_train_step

    overrides = {k: v for k, v in options.items() if k != "host_malloc"}  # the rest are model options
    if args.precision == "bf16":
        overrides.setdefault("matmul_dtype", "bfloat16")
    model = models.create(args.model, **overrides)
    config = models.model_config(args.model, **overrides)
    image_size, length = args.image_size or config["vision"].get("image_size"), config["text"]["context_length"]
    if image_size is None:
        raise SystemExit(f"{args.model} takes its image size from the data: give --image-size")
    image_shape = (image_size, image_size, 3)
    mesh = parallel.make_mesh(args.devices)
    batch_size = args.batch * args.devices if args.scaling else args.batch
    parallel.check_batch_size(batch_size, mesh, "--batch")
    optimizer = optax.adamw(1e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1,
                            mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    layout = state_layout(model, optimizer, image_shape, length, mesh)
    state = create_train_state(layout, jax.random.key(0))
    train_step = make_train_step(layout)
    rng = np.random.default_rng(0)
    batch = parallel.global_batch({
        "image": rng.standard_normal((batch_size, *image_shape), dtype=np.float32),
        "tokens": random_tokens(rng, batch_size, length, config["text"]["vocab_size"]),
    }, mesh)

    compile_start = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - compile_start
    for _ in range(args.warmup):
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)

    stages = {}
    if args.stages:
        from jclip.losses import clip_loss
        from jclip.train.step import make_gradient_step

        def forward(params, batch):
            out = model.apply({"params": params}, batch["image"], batch["tokens"])
            return clip_loss(out["zimg"], out["ztxt"], out["scale"])

        timed = lambda function: statistics.median(call_times(
            lambda: jax.block_until_ready(function(state.params, batch)), args.warmup, args.steps)[0])
        stages = {"forward": timed(jax.jit(forward)), "forward+backward": timed(make_gradient_step(model, mesh))}

    platform = jax.devices()[0].platform
    peak = measure_jax_matmul_peak(args.precision, MATMUL_SIZE.get(platform, 2048))
    if platform != "cpu":  # simulated CPU devices share the host's cores; accelerators add up
        peak *= args.devices
    # Model FLOPs are the architecture's: counted on the float32 model (a cast is not a FLOP).
    float32_model = models.create(args.model, **{k: v for k, v in overrides.items() if k != "matmul_dtype"})
    flops = training_flops_per_pair(float32_model, image_shape, length)
    result = summarize_times(times, batch_size, flops, peak)
    stats = jax.devices()[0].memory_stats() or {}
    result.update(peak_memory_mib=stats.get("peak_bytes_in_use", 0) / 2**20 or peak_memory_mib(),
                  compile_s=compile_s, loss=float(metrics["loss"]), device=jax.devices()[0].device_kind,
                  devices=args.devices, batch=batch_size,
                  parameters=sum(x.size for x in jax.tree.leaves(state.params)), stages=stages)
    return result


def call_times(run, warmup: int, steps: int) -> tuple[list[float], object]:
    """(seconds of each of `steps` calls of `run` after `1 + warmup` untimed ones (compilation, warm-up), the
    last call's result). `run` must wait for its work to finish."""
    for _ in range(1 + warmup):
        run()
    times, result = [], None
    for _ in range(steps):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return times, result


def random_tokens(rng, batch: int, length: int, vocab_size: int):
    """Token ids with an end-of-text token (the largest id) at a random position, zeros after it."""
    import numpy as np

    tokens = rng.integers(1, vocab_size - 1, size=(batch, length), dtype=np.int32)
    ends = rng.integers(length // 2, length, size=batch)
    positions = np.arange(length)[None]
    tokens = np.where(positions < ends[:, None], tokens, 0)
    tokens[np.arange(batch), ends] = vocab_size - 1
    return tokens


def measure_jax_matmul_peak(precision: str, n: int) -> float:
    """The FLOP/s of a large square matmul: float32, or bfloat16 inputs accumulated in float32."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.float32 if precision == "fp32" else jnp.bfloat16
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    jax.block_until_ready(matmul(a, b))
    return 2 * n**3 / best_time(lambda: jax.block_until_ready(matmul(a, b)))


def best_time(run, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


# ------------------------------------------------------------ OpenCLIP worker


def open_clip_worker(args) -> dict:
    import numpy as np

    from jclip import models
    from jclip.convert.torch_import import import_open_clip

    torch, open_clip = import_open_clip()
    config = models.model_config(args.model)
    vision, text = config["vision"], config["text"]
    if vision.get("type", "vit") != "vit" or "decoder" in config:
        raise SystemExit(f"--baseline open_clip supports ViT CLIP models; {args.model} is not one")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=config["embed_dim"],
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=vision["depth"], width=vision["width"], head_width=vision["width"] // vision["num_heads"],
            patch_size=vision["patch_size"], image_size=vision["image_size"]),
        text_cfg=open_clip.model.CLIPTextCfg(
            context_length=text["context_length"], vocab_size=text["vocab_size"], width=text["width"],
            heads=text["num_heads"], layers=text["depth"]),
        output_dict=True,
    ).to(device)
    # OpenCLIP's training script: no weight decay on gains, biases and the logit scale.
    decayed = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    others = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                                  lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    rng = np.random.default_rng(0)
    size, length = vision["image_size"], text["context_length"]
    images = torch.from_numpy(rng.standard_normal((args.batch, 3, size, size), dtype=np.float32)).to(device)
    tokens = torch.from_numpy(random_tokens(rng, args.batch, length, text["vocab_size"]).astype(np.int64)).to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        with torch.no_grad(), autocast:
            out = model(images, tokens)
            return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])

    def forward_backward():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            out = model(images, tokens)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        return loss

    def step():
        loss = forward_backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        return loss

    def timed(run):
        def synchronized():
            result = run()
            synchronize()
            return result
        return call_times(synchronized, args.warmup, args.steps)

    times, loss = timed(step)
    stages = {}
    if args.stages:
        stages = {"forward": statistics.median(timed(forward)[0]),
                  "forward+backward": statistics.median(timed(forward_backward)[0])}
    peak = measure_torch_matmul_peak(torch, device, args.precision)
    flops = args.flops_per_sample
    result = summarize_times(times, args.batch, flops, peak)
    memory = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_memory_mib()
    result.update(peak_memory_mib=memory, loss=float(loss), device=device, devices=1, batch=args.batch,
                  parameters=sum(p.numel() for p in model.parameters()), torch=torch.__version__,
                  open_clip=open_clip.__version__, stages=stages)
    return result


def measure_torch_matmul_peak(torch, device: str, precision: str) -> float:
    n = MATMUL_SIZE["gpu" if device == "cuda" else "cpu"]
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    return 2 * n**3 / best_time(lambda: (torch.mm(a, b), sync()))


# ------------------------------------------------------------------ the driver


def run_worker(args, worker: str, devices: int = 1, options: str = "", flops_per_sample: float = 0.0) -> dict:
    """One measurement in a fresh process; returns its JSON result.

    Options that start with `xla_flags=` are XLA flags for this process, taken whole (XLA's own
    lists use commas), so that one run compares XLA's CPU back-ends on the same step.
    """
    xla_flags = options.removeprefix("xla_flags=") if options.startswith("xla_flags=") else ""
    options = "" if xla_flags else options
    command = [sys.executable, __file__, "--worker", worker, "--model", args.model, "--batch", str(args.batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision,
               "--devices", str(devices), "--options", options, "--flops-per-sample", str(flops_per_sample)]
    if args.stages:
        command.append("--stages")
    if args.image_size:
        command += ["--image-size", str(args.image_size)]
    if args.scaling:
        command += ["--scaling", args.scaling]
    environment = dict(os.environ)
    if devices > 1:
        xla_flags += f" --xla_force_host_platform_device_count={devices}"
    if xla_flags:
        environment["XLA_FLAGS"] = f"{environment.get('XLA_FLAGS', '')} {xla_flags}".strip()
    completed = subprocess.run(command, env=environment, capture_output=True, text=True)
    if completed.returncode:
        sys.stderr.write(completed.stderr[-4000:])
        raise SystemExit(f"the {worker} measurement failed (exit {completed.returncode})")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def print_table(rows: list[tuple[str, dict]], baseline: str = None) -> None:
    columns = ("samples/s", "step s", "GFLOP/sample", "GFLOP/s", "MFU", "peak MiB")
    keys = ("samples_per_s", "median_step_s", "gflops_per_sample", "achieved_gflops_per_s", "mfu", "peak_memory_mib")
    formats = ("{:.1f}", "{:.3f}", "{:.2f}", "{:.1f}", "{:.1%}", "{:.0f}")
    width = max(len(name) for name, _ in rows) + 2
    header = f"{'':<{width}}" + "".join(f"{c:>14}" for c in columns)
    if baseline:
        header += f"{'vs ' + baseline:>16}"
    print(header)
    reference = dict(rows).get(baseline)
    for name, result in rows:
        line = f"{name:<{width}}" + "".join(f"{f.format(result[k]):>14}" for k, f in zip(keys, formats))
        if reference:
            line += f"{result['samples_per_s'] / reference['samples_per_s']:>15.2f}x"
        print(line)


def print_stages(rows: list[tuple[str, dict]]) -> None:
    """Milliseconds per stage of jclip's step and OpenCLIP's, and jclip's speed against OpenCLIP on each
    stage (OpenCLIP's time / jclip's, as the main table's ratio)."""
    results = dict(rows)
    names = [name for name in ("jclip", "open_clip") if results.get(name, {}).get("stages")]

    def stage_times(result):
        forward, both, step = result["stages"]["forward"], result["stages"]["forward+backward"], result["median_step_s"]
        return {"forward + loss": forward, "backward": both - forward, "optimizer update": step - both, "step": step}

    times = {name: stage_times(results[name]) for name in names}
    print("\nms per stage (forward + loss and forward + backward timed alone; backward and the update by difference)")
    print(f"{'':<18}" + "".join(f"{name:>12}" for name in names) + ("  jclip vs open_clip" if len(names) == 2 else ""))
    for stage in times["jclip"]:  # a difference below the timing noise shows as "~0"
        line = f"{stage:<18}" + "".join(f"{1e3 * times[name][stage]:>12.0f}" if times[name][stage] > 0
                                        else f"{'~0':>12}" for name in names)
        if len(names) == 2 and min(times[name][stage] for name in names) > 0:
            line += f"{times['open_clip'][stage] / times['jclip'][stage]:>20.2f}x"
        print(line)


def main():
    args = parse_args()
    if args.worker:
        # jclip's entry points keep freed host memory for reuse and dispatch CPU steps synchronously
        # (jclip.host_memory); OpenCLIP's row runs as its users run it, and once more with the same
        # malloc setting (host_malloc=reuse).
        from jclip import host_memory

        default_malloc = "reuse" if args.worker == "jclip" else "default"
        if parse_options(args.options).get("host_malloc", default_malloc) == "reuse":
            host_memory.reuse_freed_memory()
        if args.worker == "jclip":
            host_memory.synchronous_cpu_dispatch()
        result = jclip_worker(args) if args.worker == "jclip" else open_clip_worker(args)
        print(json.dumps(result))
        return
    summary = {"model": args.model, "precision": args.precision}
    if args.scaling:
        counts = [int(n) for n in args.scaling.split(",")]
        rows = [(f"jclip {n} device{'s' * (n > 1)}", run_worker(args, "jclip", n)) for n in counts]
        print(f"\n{args.model}, {args.precision}, {args.batch} pairs per device, on {rows[0][1]['device']}")
        print_table(rows)
        # Simulated CPU devices share one machine's cores, so ideal scaling keeps samples/s constant;
        # accelerators add their own compute, so ideal scaling multiplies it by the device count.
        simulated = rows[0][1]["device"] == "cpu"
        one = rows[0][1]["samples_per_s"] / (1 if simulated else counts[0])
        for (name, result), n in zip(rows, counts):
            ideal = one if simulated else one * n
            print(f"{name}: scaling efficiency {result['samples_per_s'] / ideal:.0%}"
                  + (" (simulated devices on shared cores: ideal is the 1-device samples/s)" if simulated else ""))
        summary["scaling"] = {n: result for n, (_, result) in zip(counts, rows)}
    else:
        rows = [("jclip", run_worker(args, "jclip"))]
        for variant in args.variant:
            name, _, options = variant.partition(":")
            rows.append((f"jclip {name}", run_worker(args, "jclip", options=options)))
        if args.baseline:
            flops = rows[0][1]["gflops_per_sample"] * 1e9
            rows.append(("open_clip", run_worker(args, "open_clip", flops_per_sample=flops)))
            rows.append(("open_clip, jclip's malloc setting",
                         run_worker(args, "open_clip", options="host_malloc=reuse", flops_per_sample=flops)))
            for _, result in rows:  # one device peak for both: the faster library's matmul
                result["peak_gflops_per_s"] = max(r["peak_gflops_per_s"] for _, r in rows)
                result["mfu"] = result["achieved_gflops_per_s"] / result["peak_gflops_per_s"]
        print(f"\n{args.model}, batch {args.batch}, {args.precision}, on {rows[0][1]['device']}; "
              f"median of {args.steps} steps; matmul peak {rows[0][1]['peak_gflops_per_s']:.0f} GFLOP/s")
        print_table(rows, "open_clip" if args.baseline else None)
        if args.stages:
            print_stages(rows)
        summary.update(rows[0][1])
        summary["rows"] = dict(rows)
        if args.baseline:
            summary["ratio_vs_open_clip"] = rows[0][1]["samples_per_s"] / dict(rows)["open_clip"]["samples_per_s"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
