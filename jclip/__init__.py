"""jclip: CLIP-style image-text contrastive training in JAX/Flax."""

__version__ = "0.1.0"
