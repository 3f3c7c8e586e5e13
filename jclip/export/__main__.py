"""`python -m jclip.export --checkpoint RUN[/checkpoints/STEP] --output DIR [--step N] [--hf]`

Writes the model of a jclip run (its latest checkpoint, or that of step N) or of a
checkpoint (`RUN/checkpoints/STEP`, such as `python -m jclip.convert` writes) into
DIR in OpenCLIP's hub layout: `open_clip_config.json` and
`open_clip_model.safetensors` (see `jclip.export`; with --hf also transformers'
`CLIPModel` files), which

    open_clip.create_model_and_transforms("local-dir:DIR")

loads, and `huggingface-cli upload` puts on the hub for `hf-hub:`. A model that
OpenCLIP cannot express, a missing checkpoint or a DIR holding an export already
stop with one line.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported: no C++ INFO lines

import argparse  # noqa: E402
import sys  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from absl import logging  # noqa: E402

from jclip.export import export  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns its exit status."""
    parser = _Parser(prog="python -m jclip.export",
                     description="Export a jclip checkpoint in OpenCLIP's hub layout (open_clip_config.json, "
                                 "open_clip_model.safetensors).")
    parser.add_argument("--checkpoint", required=True,
                        help="A run directory (its latest checkpoint) or a RUN/checkpoints/STEP directory.")
    parser.add_argument("--output", required=True, help="The directory to write the export to.")
    parser.add_argument("--step", type=int, default=None, help="With a run directory: the step to export.")
    parser.add_argument("--hf", action="store_true", help="Also write Hugging Face transformers' CLIPModel "
                        "(config.json, model.safetensors, preprocessor_config.json) for models it expresses.")
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a bad flag (one line, see _Parser)
        return stop.code
    logging.set_verbosity(logging.WARNING)
    try:
        exported = export(args.checkpoint, args.output, step=args.step, hf=args.hf)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    name = f"{exported.model_name} " if exported.model_name else ""
    print(f"Wrote the {name}model of step {exported.step} to {exported.directory}: {', '.join(exported.files)}.")
    for note in exported.notes:
        print(f"note: {note}")
    print(f'Load it with open_clip.create_model_and_transforms("local-dir:{exported.directory}").')
    return 0


def run():
    sys.exit(main())


if __name__ == "__main__":
    run()
