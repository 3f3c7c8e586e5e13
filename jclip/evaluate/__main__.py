"""`python -m jclip.evaluate --config CONFIG (--workdir DIR | --checkpoint PATH[,PATH...]) [--tasks a,b]
[--step N | --all_steps] [--data_dir D] [--table FILE] [--max_patches N]`

Runs the evaluation tasks of CONFIG (`config.evaluate.tasks`, or those `--tasks` names) on the latest
checkpoint of DIR (or the one of step N, or with --all_steps every checkpoint it keeps), or on the
checkpoints at PATH (`RUN/checkpoints/STEP` directories, such as `python -m jclip.convert` writes from
OpenCLIP weights, or run directories). Writes results.json and plots/ to DIR (default: each checkpoint's run
directory), prints a table per task, and adds the metrics to one table across checkpoints (FILE, default
DIR/evaluations.csv; a .json name writes JSON) with its figure against training step; the (checkpoint, task)
pairs FILE holds already are not evaluated again unless --reevaluate. --max_patches evaluates a NaFlex
model at another token budget (give each budget its own --table).
"""

from jclip.host_memory import prepare_host

prepare_host()  # before JAX starts its threads

from absl import flags  # noqa: E402

from jclip import cli  # noqa: E402
from jclip.evaluate.from_checkpoint import evaluate_checkpoints  # noqa: E402

flags.DEFINE_integer("step", None, "Evaluate the checkpoint of this step instead of the latest.")
flags.DEFINE_bool("all_steps", False, "Evaluate every checkpoint the run keeps (to follow a run's progress).")
flags.DEFINE_list("checkpoint", None, "Checkpoint directories (RUN/checkpoints/STEP) or run directories to "
                  "evaluate, comma-separated, instead of --workdir's latest.")
flags.DEFINE_list("tasks", None, "Names of config.evaluate.tasks to run (default: all).")
flags.DEFINE_string("data_dir", None, "Where the datasets are: sets config.data.data_dir (tfds's data dir, and "
                    "{data_dir} in dataset paths, as in configs/benchmark_suite.py).")
flags.DEFINE_string("table", None, "The results table to add to (.csv or .json; default: "
                    "evaluations.csv in the report's directory).")
flags.DEFINE_bool("reevaluate", False, "Evaluate (checkpoint, task) pairs that the table holds already, "
                  "replacing their rows.")
flags.DEFINE_integer("max_patches", None, "For NaFlex models: the token budget (patches per image) to evaluate "
                     "at, instead of the training budget; sets config.evaluate.max_patches.")


def evaluate(config, workdir):
    if cli.FLAGS.data_dir:
        config.data.data_dir = cli.FLAGS.data_dir
    if cli.FLAGS.max_patches:
        with config.unlocked():
            config.evaluate.max_patches = cli.FLAGS.max_patches
    evaluate_checkpoints(config, workdir, cli.FLAGS.checkpoint or (), cli.FLAGS.step, all_steps=cli.FLAGS.all_steps,
                         tasks=cli.FLAGS.tasks, table=cli.FLAGS.table, reevaluate=cli.FLAGS.reevaluate)


def run():
    cli.run_command(evaluate, workdir_required=False)


if __name__ == "__main__":
    run()
