"""`python -m jclip.evaluate --config configs/shapes_tiny.py --workdir DIR [--step N]`

Evaluates the latest checkpoint in DIR (or the one at step N); writes
DIR/results.json and prints a table.
"""

from absl import flags

from jclip import cli
from jclip.evaluate.from_checkpoint import evaluate_checkpoint

flags.DEFINE_integer("step", None, "Evaluate the checkpoint of this step instead of the latest.")


def main(argv):
    del argv
    cli.require("config")
    cli.require("workdir")
    cli.join_multihost_job()
    try:
        evaluate_checkpoint(cli.FLAGS.config, cli.FLAGS.workdir, cli.FLAGS.step)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")


def run():
    cli.run_main(main)


if __name__ == "__main__":
    run()
