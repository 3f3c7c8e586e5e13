"""`python -m jclip.evaluate --config configs/shapes_tiny.py --workdir DIR`

Evaluates the latest checkpoint in DIR; writes DIR/results.json and prints a table.
"""

from jclip import cli, models, parallel
from jclip.checkpoint import Checkpointer
from jclip.data.sources import load_source
from jclip.evaluate.shapes_benchmark import evaluate_and_report
from jclip.train.optimizer import build_optimizer
from jclip.train.state import abstract_train_state


def main(argv):
    del argv
    cli.require("config")
    cli.require("workdir")
    config, workdir = cli.FLAGS.config, cli.FLAGS.workdir
    try:
        mesh = parallel.make_mesh()
        builder, tokenizer = load_source(config.data)
        model = models.CLIP(**config.model)
        checkpointer = Checkpointer(workdir, config.model.to_dict(), save_every=1)
        abstract = abstract_train_state(model, build_optimizer(config), builder.info.features["image"].shape,
                                        config.data.text_length, mesh)
        state, _ = checkpointer.restore(abstract)
        evaluate_and_report(model, state.params, builder, tokenizer, config, workdir, mesh, int(state.step))
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")


def run():
    cli.run_main(main)


if __name__ == "__main__":
    run()
