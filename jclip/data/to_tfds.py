"""`python -m jclip.data.to_tfds --csv pairs.tsv --name my_pairs --data_dir DIR` (or `--tar 'shards/*.tar'`)

Converts image–caption pairs into a tfds dataset in ArrayRecord format, for
fast random access and per-process splits. Images are stored as they are
(no re-encoding); unreadable files are stored empty and skipped, counted, by
the training pipeline. Train on it with

    --config.data.sources.mine="{'kind': 'tfds', 'name': 'DIR/my_pairs/1.0.0', 'caption_key': 'captions'}"
"""

import argparse
import os

import tensorflow as tf
import tensorflow_datasets as tfds

from jclip.data.sources import Source, csv_source, tar_source


def _pairs(source: Source) -> tf.data.Dataset:
    def read(example):
        path = example["image_path"]
        image = tf.cond(tf.strings.length(path) > 0, lambda: _read_or_empty(path), lambda: example["image"])
        return {"image": image, "captions": example["captions"]}
    return source.examples.map(read)


def _read_or_empty(path):
    """The file's bytes, or b"" where there is no file (missing, or a directory): an unusable example, which
    training skips and counts as it does when reading the source directly."""
    return tf.py_function(lambda p: open(p.numpy(), "rb").read() if os.path.isfile(p.numpy()) else b"",
                          [path], tf.string)


def convert(source: Source, name: str, data_dir: str, version: str = "1.0.0") -> str:
    """Write `source` as the `train` split of tfds dataset `name`; returns the dataset's directory."""
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(), dtype=tf.string),
        "captions": tfds.features.Sequence(tfds.features.Text()),
    })
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version=version, features=features, data_dir=data_dir,
        split_datasets={"train": _pairs(source)}, file_format="array_record",
        description=f"Image–caption pairs converted by jclip from {source.name}.",
    )
    return str(builder.data_dir)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--csv", help="CSV or TSV of image paths and captions")
    inputs.add_argument("--tar", help="glob of WebDataset tar shards")
    parser.add_argument("--image_column", default="filepath")
    parser.add_argument("--caption_column", default="caption")
    parser.add_argument("--name", required=True, help="dataset name")
    parser.add_argument("--data_dir", required=True, help="tfds data directory to write into")
    args = parser.parse_args()
    try:
        source = (csv_source(args.csv, image_column=args.image_column, caption_column=args.caption_column,
                             process_index=0, process_count=1)
                  if args.csv else tar_source(args.tar, process_index=0, process_count=1))
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    print(f"Wrote {source.num_examples} examples to {convert(source, args.name, args.data_dir)}")


if __name__ == "__main__":
    main()
