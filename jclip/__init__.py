"""jclip: CLIP-style image-text contrastive training in JAX/Flax.

`jclip.load(path, model=None)` gives a trained or converted model that embeds and classifies images and
texts (`jclip.loaded_model`); it is imported on first use, so `import jclip` stays light.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "load":
        from jclip.loaded_model import load

        return load
    raise AttributeError(f"module 'jclip' has no attribute {name!r}")
