"""`python -m jclip.evaluate --config CONFIG (--workdir DIR | --checkpoint PATH) [--tasks a,b] [--step N]`

Runs the evaluation tasks of CONFIG (`config.evaluate.tasks`, or those `--tasks`
names) on the latest checkpoint of DIR (or the one of step N), or on the
checkpoint at PATH (a `RUN/checkpoints/STEP` directory, such as one that
`python -m jclip.convert` wrote from OpenCLIP weights). Writes results.json and
plots/ to DIR (default: the checkpoint's run directory) and prints a table per task.
"""

from jclip.host_memory import reuse_freed_memory

reuse_freed_memory()  # before JAX starts its threads

from absl import flags  # noqa: E402

from jclip import cli  # noqa: E402
from jclip.evaluate.from_checkpoint import evaluate_checkpoint  # noqa: E402

flags.DEFINE_integer("step", None, "Evaluate the checkpoint of this step instead of the latest.")
flags.DEFINE_string("checkpoint", None, "A checkpoint directory (RUN/checkpoints/STEP) or run directory to "
                    "evaluate, instead of --workdir's latest.")
flags.DEFINE_list("tasks", None, "Names of config.evaluate.tasks to run (default: all).")


def run():
    cli.run_command(
        lambda config, workdir: evaluate_checkpoint(config, workdir, cli.FLAGS.step, checkpoint=cli.FLAGS.checkpoint,
                                                    tasks=cli.FLAGS.tasks),
        workdir_required=False,
    )


if __name__ == "__main__":
    run()
