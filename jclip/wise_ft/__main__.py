"""`python -m jclip.wise_ft --config CONFIG --pretrained P --finetuned F --workdir OUT [--alphas ...] [--tasks ...]
[--select TASK/METRIC]`: WiSE-FT's weight-space mixtures evaluated, the best saved (see `jclip.wise_ft`)."""

from jclip.host_memory import prepare_host

prepare_host()  # before JAX starts its threads

from absl import flags  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from jclip import cli  # noqa: E402
from jclip.wise_ft import DEFAULT_ALPHAS, parse_alphas, wise_ft  # noqa: E402

flags.DEFINE_string("pretrained", None, "The pretrained checkpoint (α = 0): a run directory (its latest), "
                    "RUN/checkpoints/STEP or a converted checkpoint.")
flags.DEFINE_string("finetuned", None, "The checkpoint fine-tuned from it (α = 1), given the same ways.")
flags.DEFINE_list("alphas", [f"{a:g}" for a in DEFAULT_ALPHAS], "Mixing coefficients in [0, 1] to evaluate.")
flags.DEFINE_list("tasks", None, "Names of config.evaluate.tasks to run (default: all).")
flags.DEFINE_string("select", None, "TASK/METRIC whose best value chooses the mixture to save, e.g. "
                    "shapes/zero_shot/shape/held_out (default: the first task's first headline metric).")


def action(config: ConfigDict, workdir: str) -> None:
    cli.require("pretrained")
    cli.require("finetuned")
    wise_ft(config, cli.FLAGS.pretrained, cli.FLAGS.finetuned, workdir, parse_alphas(cli.FLAGS.alphas),
            cli.FLAGS.tasks, cli.FLAGS.select)


def run():
    cli.run_command(action)


if __name__ == "__main__":
    run()
