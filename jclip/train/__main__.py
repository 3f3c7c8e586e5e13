"""`python -m jclip.train --config configs/shapes_tiny.py --workdir DIR [--config.KEY=VALUE ...]`

Trains, resuming from the latest checkpoint in DIR if there is one, and
evaluates at the end. `--multihost` joins a multi-process job.
"""

from jclip import cli
from jclip.train.loop import train


def run():
    cli.run_command(train)


if __name__ == "__main__":
    run()
