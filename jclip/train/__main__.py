"""`python -m jclip.train --config configs/shapes_tiny.py --workdir DIR [--config.KEY=VALUE ...]`

Trains, resuming from the latest checkpoint in DIR if there is one, and
evaluates at the end. `--multihost` joins a multi-process job.
"""

from jclip.host_memory import prepare_host

prepare_host()  # before JAX starts its threads

from jclip import cli  # noqa: E402
from jclip.train.loop import train  # noqa: E402


def run():
    cli.run_command(train)


if __name__ == "__main__":
    run()
