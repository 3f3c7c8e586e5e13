"""`python -m jclip.models [NAME ...]`: a table of parameters and GFLOPs per named model.

Models without a fixed resolution (the small built-in ones) are measured at 224 px.
"""

import sys

from jclip.models.registry import list_models
from jclip.models.summary import summarize


def main(names: list[str]) -> None:
    unknown = sorted(set(names) - set(list_models()))
    if unknown:
        raise SystemExit(f"error: unknown model(s) {unknown}; known: {', '.join(list_models())}")
    print(f"{'model':<22}{'params (M)':>12}{'image px':>10}{'image GFLOPs':>14}{'text GFLOPs':>13}")
    for name in names or list_models():
        row = summarize(name)
        print(f"{name:<22}{row['params_m']:>12.2f}{row['image_size']:>10}{row['image_gflops']:>14.2f}"
              f"{row['text_gflops']:>13.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
