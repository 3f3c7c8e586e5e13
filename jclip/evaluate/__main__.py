"""`python -m jclip.evaluate --config configs/shapes_tiny.py --workdir DIR [--step N]`

Evaluates the latest checkpoint in DIR (or the one at step N); writes
DIR/results.json and prints a table.
"""

from absl import flags

from jclip import cli
from jclip.evaluate.from_checkpoint import evaluate_checkpoint

flags.DEFINE_integer("step", None, "Evaluate the checkpoint of this step instead of the latest.")


def run():
    cli.run_command(lambda config, workdir: evaluate_checkpoint(config, workdir, cli.FLAGS.step))


if __name__ == "__main__":
    run()
