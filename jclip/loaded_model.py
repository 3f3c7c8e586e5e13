"""`jclip.load`: a trained or converted model that embeds and classifies images and texts, in a few lines.

    import jclip
    model = jclip.load("runs/my_run")   # a run (its latest checkpoint), RUN/checkpoints/STEP, a converted
                                        # checkpoint, or OpenAI / OpenCLIP weights: load("w.safetensors", model="ViT-B-32")
    classifier = model.zero_shot_classifier(["cat", "dog"], ["a photo of a {}."])
    print(model.classify(["pet.jpg"], classifier).labels)

This is what OpenCLIP's `create_model_and_transforms` and `get_tokenizer` give their users. Images (file
paths, PIL images or uint8 arrays of any size) are preprocessed as the model's evaluation expects: the
run's own evaluation preprocessing (`jclip.evaluate.from_checkpoint.evaluation_preprocess`), or OpenCLIP's
transform for its weights. They are embedded one batch at a time, split over this process's devices.
"""

import dataclasses
import itertools
import os
from typing import Any, Iterable, Optional, Sequence, Union

import jax
import numpy as np
import tensorflow as tf
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict
from PIL import Image

from jclip import models, parallel
from jclip.checkpoint import load_model, locate, read_record, run_config
from jclip.convert.open_clip import data_settings, from_open_clip
from jclip.convert.state_dict_files import load_state_dict
from jclip.data import preprocess as preprocess_ops
from jclip.data import naflex, prompts
from jclip.data.tokenizers import load_tokenizer
from jclip.evaluate.classification import zero_shot_classifier
from jclip.evaluate.from_checkpoint import evaluation_preprocess
from jclip.evaluate.zero_shot import softmax

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


class ImagePreprocess:
    """An evaluation preprocessing spec as a function of one image: a file path (its bytes decoded as the
    evaluation pipeline decodes them), a PIL image or a uint8 `[H, W, 3]` array -> the model's input array."""

    def __init__(self, spec: str):
        ops = preprocess_ops.parse_ops(spec)
        if not ops or ops[0][0] != "decode":
            raise ValueError(f"an evaluation preprocessing starts with decode; got {spec!r}")
        self.spec = spec
        seed = tf.zeros([2], tf.int64)
        from_pixels, from_bytes = preprocess_ops.compose(ops[1:]), preprocess_ops.compose(ops)
        self._from_pixels = tf.function(lambda image: from_pixels(image, seed),
                                        input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
        self._from_bytes = tf.function(lambda data: from_bytes(data, seed), input_signature=[tf.TensorSpec([], tf.string)])

    def __call__(self, image: ImageInput) -> np.ndarray:
        if isinstance(image, (str, os.PathLike)):
            if not os.path.isfile(image):
                raise FileNotFoundError(f"no image file {image}")
            with open(image, "rb") as f:
                data = f.read()
            try:
                return _numpy(self._from_bytes(tf.constant(data)))
            except tf.errors.InvalidArgumentError:
                raise ValueError(f"{image} cannot be decoded as an image (PNG, JPEG, GIF or BMP)") from None
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"an image array must be uint8 [height, width, 3]; got {image.dtype} {image.shape}")
        return _numpy(self._from_pixels(tf.constant(image)))


def _numpy(model_input):
    """A preprocessed image (a tensor, or a NaFlex patch input's dict of tensors) as NumPy."""
    return tf.nest.map_structure(lambda tensor: tensor.numpy(), model_input)


@dataclasses.dataclass
class ZeroShotClassifier:
    """Prompt-ensembled class embeddings (Radford et al. 2021, 3.1.4) and the names of their classes."""

    class_names: list[str]
    weights: np.ndarray  # [classes, dim], normalised


@dataclasses.dataclass
class Predictions:
    """The top-k classes of each image, best first."""

    labels: list[list[str]]
    indices: np.ndarray  # [images, k]
    probabilities: np.ndarray  # [images, k]: softmax over the classes of scale * similarity (sigmoid with a bias)


class LoadedModel:
    """A model with its parameters, tokenizer and evaluation preprocessing, on this process's devices."""

    def __init__(self, name: Optional[str], config: ConfigDict, model: nn.Module, params: Any, tokenizer: Any,
                 preprocess: ImagePreprocess, mesh: Mesh, batch_size: int):
        self.name, self.config, self.model, self.params = name, config, model, params
        self.tokenizer, self.preprocess, self.mesh = tokenizer, preprocess, mesh
        devices = mesh.devices.size
        self.batch_size = -(-batch_size // devices) * devices
        self._batch_sharding = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
        self._encode_image = jax.jit(lambda params, x: model.apply({"params": params}, x, method=model.encode_image))
        self._encode_text = jax.jit(lambda params, x: model.apply({"params": params}, x, method=model.encode_text))

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def text_length(self) -> int:
        return self.config.data.text_length

    @property
    def scale(self) -> float:
        """exp(logit_scale): the inverse temperature the model was trained with."""
        return float(np.exp(jax.device_get(self.params["logit_scale"])))

    @property
    def bias(self) -> Optional[float]:
        """The sigmoid loss's learnt bias (SigLIP), or None."""
        return float(jax.device_get(self.params["logit_bias"])) if "logit_bias" in self.params else None

    def _encode(self, encode, batches: Iterable[np.ndarray]) -> np.ndarray:
        """Normalised embeddings of every row of `batches` (each at most `batch_size` rows), padded to a
        multiple of the device count: one compiled shape for the full batches, one for a last partial one."""
        devices = self.mesh.devices.size
        outputs = []
        for batch in batches:
            rows = naflex.row_count(batch)
            padded = naflex.pad_rows(batch, rows + -rows % devices)
            embeddings = encode(self.params, jax.device_put(padded, self._batch_sharding))
            outputs.append(np.asarray(jax.device_get(embeddings))[:rows])
        if not outputs:
            return np.zeros((0, self.model.embed_dim), np.float32)
        return np.concatenate(outputs)

    def encode_images(self, images: Iterable[ImageInput]) -> np.ndarray:
        """[N, dim] normalised embeddings of `images` (file paths, PIL images or uint8 [H, W, 3] arrays, or a
        uint8 [N, H, W, 3] array), preprocessed as the model's evaluation expects. Only one batch of
        decoded images is held at a time, so `images` may be a generator over a large set."""
        iterator = iter(images)

        def batches():
            while chunk := list(itertools.islice(iterator, self.batch_size)):
                yield naflex.stack([self.preprocess(image) for image in chunk])
        return self._encode(self._encode_image, batches())

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[N, dim] normalised embeddings of `texts`, tokenized with the model's tokenizer."""
        if isinstance(texts, str):
            texts = [texts]
        if self.tokenizer is None:
            raise ValueError(f"no tokenizer for model {self.name!r}: OpenCLIP downloads it from the hub; pass "
                             "jclip.load(..., tokenizer='sentencepiece:PATH') (or 'clip', or a tokenizer .json)")
        tokens = self.tokenizer(list(texts), self.text_length).astype(np.int32)
        return self._encode(self._encode_text, (tokens[start:start + self.batch_size]
                                                for start in range(0, len(tokens), self.batch_size)))

    def zero_shot_classifier(self, class_names: Sequence[str], templates: Union[str, Sequence[str]] = "simple"
                             ) -> ZeroShotClassifier:
        """A classifier of `class_names` by prompt ensembling over `templates` ("a photo of a {}."; a name of
        `jclip.data.prompts.TEMPLATES`, such as "openai_imagenet", or a list)."""
        names = list(class_names)
        return ZeroShotClassifier(names, zero_shot_classifier(self.encode_texts, names, prompts.templates(templates)))

    def classify(self, images: Iterable[ImageInput], classifier: ZeroShotClassifier, top_k: int = 1) -> Predictions:
        """The `top_k` classes of each image and their probabilities: softmax over the classes of the
        model's scale times the similarities, or, for a model with a bias (SigLIP), each class's sigmoid."""
        logits = self.scale * self.encode_images(images) @ classifier.weights.T
        if self.bias is None:
            probabilities = softmax(logits)
        else:
            probabilities = 1 / (1 + np.exp(-(logits + self.bias)))
        top = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
        return Predictions([[classifier.class_names[i] for i in row] for row in top], top,
                           np.take_along_axis(probabilities, top, axis=1))


def _local_mesh() -> Mesh:
    devices = jax.local_devices()
    return jax.make_mesh((len(devices),), (parallel.DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)


def load(path: Union[str, os.PathLike], model: Optional[str] = None, *, step: Optional[int] = None,
         tokenizer: Optional[str] = None, batch_size: int = 256, max_patches: Optional[int] = None) -> LoadedModel:
    """The model at `path`: a run directory (its latest checkpoint, or `step`), a `RUN/checkpoints/STEP`
    directory, a converted checkpoint, or an OpenAI / OpenCLIP weight file (.safetensors, .pt, .bin) of
    the jclip model `model` (converted in memory, nothing written). `tokenizer` replaces the model's
    (a `config.data.tokenizer` name); `batch_size` is how many images or texts are embedded at once;
    `max_patches` is the token budget a NaFlex model embeds images at (default: the one it trained with)."""
    path = os.fspath(path)
    mesh = _local_mesh()
    if os.path.isfile(path):
        if model is None:
            raise ValueError(f"{path} is a weight file: name its model, e.g. jclip.load({path!r}, model='ViT-B-32') "
                             f"(models: {', '.join(models.list_models())})")
        settings = data_settings(model)
        config = ConfigDict({"data": {**settings, "data_dir": None}, "evaluate": {"preprocess": settings["preprocess"]},
                             "model": models.model_config(model), "model_name": model})
        loaded_tokenizer = _tokenizer(tokenizer or settings["tokenizer"], None)
        module = models.create(model)
        params = jax.device_put(from_open_clip(load_state_dict(path), model), NamedSharding(mesh, PartitionSpec()))
    elif os.path.isdir(path):
        run_directory, step = locate(None, path, step)
        config = run_config(run_directory, read_record(run_directory, step))
        loaded_tokenizer = _tokenizer(tokenizer or config.data.tokenizer, config.data.data_dir)
        module, params, record = load_model(config, run_directory, step, mesh, loaded_tokenizer, verbose=False)
        if model is not None and models.architecture_differences(record["model"], models.model_config(model)):
            raise ValueError(f"{path} holds a checkpoint of another model than {model!r}; leave out model=")
        model = model or config.get("model_name")
    else:
        raise FileNotFoundError(f"no run, checkpoint or weight file at {path}")
    if max_patches:
        config = ConfigDict(config.to_dict())
        config.evaluate.max_patches = max_patches
    return LoadedModel(model, config, module, params, loaded_tokenizer, ImagePreprocess(evaluation_preprocess(config)),
                       mesh, batch_size)


def _tokenizer(name: Optional[str], data_dir: Optional[str]):
    return load_tokenizer(name, data_dir) if name else None
