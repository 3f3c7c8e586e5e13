"""`python -m jclip.train --config configs/shapes_tiny.py --workdir DIR [--config.KEY=VALUE ...]`

Trains, resuming from the latest checkpoint in DIR if there is one, and
evaluates at the end.
"""

from jclip import cli
from jclip.train.loop import train


def main(argv):
    del argv
    cli.require("config")
    cli.require("workdir")
    cli.join_multihost_job()
    try:
        train(cli.FLAGS.config, cli.FLAGS.workdir)
    except ValueError as error:
        raise SystemExit(f"error: {error}")


def run():
    cli.run_main(main)


if __name__ == "__main__":
    run()
