"""`python -m jclip.convert --model NAME --input FILE --output DIR [--config configs/NAME.py]`

Converts OpenAI / OpenCLIP PyTorch weights (.safetensors, .pt, .bin) of model
NAME (see `python -m jclip.models`; default: the config's `model_name`) into a
parameters-only jclip checkpoint in DIR, which

    python -m jclip.evaluate --config CONFIG --workdir DIR

evaluates (with the model the checkpoint records), and which a training run with
`--workdir DIR` and NAME's model starts from.
"""

from absl import flags

from jclip import cli
from jclip.convert.open_clip import from_open_clip
from jclip.convert.state_dict_files import load_state_dict
from jclip.convert.to_checkpoint import save_converted

flags.DEFINE_string("model", None, "jclip model name (default: the config's model_name).")
flags.DEFINE_string("input", None, "PyTorch weight file: .safetensors, .pt, .pth or .bin.")
flags.DEFINE_string("output", None, "Directory to write the checkpoint to (a workdir).")


def main(argv):
    del argv
    cli.require("input")
    cli.require("output")
    config = cli.FLAGS.config
    name = cli.FLAGS.model or (config.model_name if config is not None else None)
    if name is None:
        raise SystemExit("error: --model is required (or a --config with model_name)")
    try:
        params = from_open_clip(load_state_dict(cli.FLAGS.input), name)
        directory = save_converted(params, name, cli.FLAGS.output, source=cli.FLAGS.input)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        raise SystemExit(f"error: {error}")
    print(f"Wrote {name} weights from {cli.FLAGS.input} to {directory}.")


def run():
    cli.run_main(main)


if __name__ == "__main__":
    run()
