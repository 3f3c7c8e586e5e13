"""Input pipeline: datasets, tokenizers, preprocessing and per-process sharding."""
