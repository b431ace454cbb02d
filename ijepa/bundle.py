"""A bundle on disk: the folder layout the app loads, loaders that check each part against the model, and a
random-weight bundle for tests and benchmarks.

    assets/
      model/                      encoder, target encoder, predictor (ijepa.checkpoint: config.json + safetensors)
      decoder/, decoder_paper/    sketch decoders by conditioning (DECODER_DIRS; diffusers save_pretrained folders)
      probe_subgroup.*, probe_group.*   linear probes on true box features (train.eval)
      bank.*                      reference boxes for the nearest-neighbour panel (train.default)
      examples/examples.json      example images with boxes drawn in advance

Every part except ``model/`` is optional. Each loader raises ValueError or FileNotFoundError with what is wrong
and how to make the part, never a bare KeyError from deep inside.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import SafetensorError
from safetensors.torch import load_file

from decoder import DecoderWeightsMismatch, SketchDecoder

from .checkpoint import (DECODER_WEIGHTS_NAME, WEIGHTS_NAME, recipe_bundle_hint, save_model, save_safetensors,
                         share_as_umask_allows)
from .errors import InputError
from .inference import LinearReadout, open_image, to_rgb
from .model import IJepa, IJepaConfig

DEFAULT_ASSETS = Path(__file__).resolve().parents[1] / "assets"
MODEL_DIR = "model"
# The two kinds of sketch decoder, by their conditioning: a bundle's folder for each, the default first.
DECODER_DIRS = {"spatial_context": "decoder", "pooled": "decoder_paper"}
PROBE_NAMES = ("group", "subgroup")  # coarse first: the readout and the explanation list them in this order
BANK_NAME = "bank"
MODEL_CARD_NAME = "MODEL_CARD.md"
METRICS_NAME = "metrics.json"  # what train.default measured: the model card is written from it
EXAMPLES_DIR, EXAMPLES_INDEX = "examples", "examples.json"
TRAIN_DECODER_HINT = "python -m train.decoder --checkpoint {checkpoint}"
# What the repository's assets/ may hold in all: the default bundle ships in git and every clone downloads it.
SHIPPED_SIZE_LIMIT = 60 * 2**20


def bundle_metrics_path(bundle: Path) -> Path:
    """The metrics.json of a bundle train.default exported (commands that rewrite its card start from it);
    FileNotFoundError, pointing at the bundle when given the recipe's out-dir, for a folder without one."""
    path = Path(bundle) / METRICS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {bundle} is not a bundle exported by train.default"
                                f"{recipe_bundle_hint(bundle)}")
    return path


def folder_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def train_decoder_hint(checkpoint: str | Path, config: IJepaConfig, conditioning: str | None = None) -> str:
    """The command that trains a decoder of this kind for ``checkpoint`` (the default kind: spatial_context). A
    model that did not learn the emoji world (the official weights) needs its own kind of images to decode."""
    hint = TRAIN_DECODER_HINT.format(checkpoint=checkpoint)
    if not config.data_fingerprint:
        hint += " --data /path/to/images"
    return hint + f" --conditioning {conditioning}" if conditioning not in (None, "spatial_context") else hint


@dataclass(frozen=True)
class FeatureBank:
    """Pooled TRUE box features of labelled reference boxes, with thumbnails to show as neighbours."""

    features: torch.Tensor  # [n, D] float32
    thumbnails: np.ndarray  # [n, h, w, 3] uint8
    subgroup: torch.Tensor  # [n] long, index into labels
    labels: tuple[str, ...]

    # the bank's mean feature: what every box shares, taken out before comparing boxes (computed once, at load)
    centre: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "centre", self.features.mean(dim=0))

    def label_of(self, index: int) -> str:
        return self.labels[int(self.subgroup[index])]


@dataclass(frozen=True)
class Example:
    """An example image with boxes drawn in advance, so one click shows something."""

    path: Path
    boxes: tuple[tuple[float, float, float, float], ...]
    caption: str
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)  # as decoded by load_examples

    def image(self) -> np.ndarray:
        """The example as an upright RGB uint8 array: the one ``load_examples`` decoded (read-only, shared), else
        read from disk."""
        return self.pixels if self.pixels is not None else np.asarray(to_rgb(open_image(self.path)))


def load_decoder(path: str | Path, model: IJepa, checkpoint: str | Path = "<checkpoint>") -> SketchDecoder:
    """A ``save_pretrained`` folder -> SketchDecoder (float32), checked against the model it will decode
    (``checkpoint`` names that model in the how-to-train hint)."""
    path, config = Path(path), model.config
    if not (path / "config.json").is_file() and (path / "decoder" / DECODER_WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{path} is a decoder run folder: its decoder is {path / 'decoder'}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a sketch decoder folder (no config.json); train one with "
                                f"`{train_decoder_hint(checkpoint, config)}`")
    try:
        conditioning = json.loads((path / "config.json").read_text()).get("conditioning")
    except (json.JSONDecodeError, AttributeError):
        conditioning = None  # from_pretrained below says what is wrong with the file
    hint = train_decoder_hint(checkpoint, config, conditioning)
    if (path / WEIGHTS_NAME).is_file() and not (path / DECODER_WEIGHTS_NAME).is_file():
        raise ValueError(f"{path} is a model folder ({WEIGHTS_NAME}), not a sketch decoder: load it with "
                         f"--checkpoint. A decoder folder holds {DECODER_WEIGHTS_NAME} (train one with `{hint}`)")
    try:
        decoder = SketchDecoder.load_checked(path).float().eval()
    except DecoderWeightsMismatch as err:
        raise ValueError(f"{err} Copy the folder again, or train one with `{hint}`") from None
    except (OSError, SafetensorError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the sketch decoder (truncated download, or not a safetensors decoder "
                         f"folder): {err} Copy the folder again, or train one with "
                         f"`{hint}`") from None
    expected = {"feature_dim": config.embed_dim, "grid_size": tuple(config.grid_size), "image_size": config.img_size}
    found = {"feature_dim": decoder.config.feature_dim, "grid_size": tuple(decoder.config.grid_size),
             "image_size": decoder.config.image_size}
    if found != expected:
        raise ValueError(f"the decoder in {path} was built for {found}, but the model has {expected}; train a "
                         f"decoder for this model with `{hint}`")
    signature = list(decoder.config.model_signature or [])
    if signature and not model.has_signature(signature):
        raise ValueError(f"the decoder in {path} learnt another model's features (same shapes, other weights), so "
                         f"its sketches would not show this model's predictions; train a decoder for this model "
                         f"with `{hint}`")
    return decoder


def load_readouts(assets: Path, dim: int, notes: list[str],
                  model: IJepa | None = None) -> tuple[dict[str, LinearReadout], FeatureBank | None]:
    """The bundle's probes and reference bank (each optional) for ``dim``-d features (of ``model``, if given);
    appends to ``notes`` what is missing, unreadable or made from another model, so such a part turns its panel off
    instead of stopping the app."""
    probes = {}
    for name in PROBE_NAMES:
        path = assets / f"probe_{name}.safetensors"
        if path.is_file():
            try:
                probes[name] = load_probe(path, dim, model)
            except (FileNotFoundError, ValueError) as err:
                notes.append(f"The {name} probe could not be read ({err}), so it gives no readout.")
    if not probes:
        notes.append(f"No usable linear probe in {assets} (probe_subgroup.safetensors + .json from train.eval), so "
                     "there is no label readout.")
    bank = None
    if (assets / f"{BANK_NAME}.safetensors").is_file():
        try:
            bank = load_bank(assets / f"{BANK_NAME}.safetensors", dim, model)
        except (FileNotFoundError, ValueError) as err:
            notes.append(f"The reference bank could not be read ({err}), so there are no nearest neighbours.")
    else:
        notes.append(f"No reference bank in {assets} ({BANK_NAME}.safetensors + .json), so there are no nearest "
                     "neighbours.")
    return probes, bank


def _read_labels(path: Path, model: IJepa | None = None) -> list[str]:
    """The label names in a probe's or bank's JSON; with ``model``, also refuses one made from another model's
    features (its ``model_signature``, where recorded: the signature the sketch decoders carry)."""
    try:
        index = json.loads(path.read_text())
        labels, signature = index["labels"], index.get("model_signature")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: it holds the label names ({{\"labels\": [...]}})") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: expected JSON {{\"labels\": [...]}}: {err}") from None
    if model is not None and signature and not model.has_signature(signature):
        raise ValueError(f"{path.with_suffix('')} was made from another model's features (same shapes, other "
                         "weights), so it would misread this model's")
    return [str(label) for label in labels]


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: cannot read the tensors (truncated or not safetensors): {err}") from None


def load_probe(path: str | Path, dim: int, model: IJepa | None = None) -> LinearReadout:
    """``<name>.safetensors`` (``train.eval.save_probe``) + ``<name>.json`` labels -> LinearReadout; with ``model``,
    one fitted on another model's features is refused."""
    path = Path(path)
    probe = LinearReadout.from_state_dict(_read_tensors(path), _read_labels(path.with_suffix(".json"), model))
    if probe.dim != dim:
        raise ValueError(f"{path} reads {probe.dim}-d features but the model makes {dim}-d ones")
    return probe


def load_bank(path: str | Path, dim: int, model: IJepa | None = None) -> FeatureBank:
    """``bank.safetensors`` {features [n, D], thumbnails uint8 [n, h, w, 3], subgroup [n]} + ``bank.json``; with
    ``model``, a bank of another model's features is refused."""
    path = Path(path)
    tensors = _read_tensors(path)
    missing = [k for k in ("features", "thumbnails", "subgroup") if k not in tensors]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}")
    features, thumbnails, subgroup = tensors["features"].float(), tensors["thumbnails"], tensors["subgroup"].long()
    labels = tuple(_read_labels(path.with_suffix(".json"), model))
    n = features.size(0)
    if features.dim() != 2 or features.size(1) != dim:
        raise ValueError(f"{path}: features must be [n, {dim}], got {tuple(features.shape)}")
    if thumbnails.dim() != 4 or thumbnails.size(0) != n or thumbnails.size(3) != 3 or thumbnails.dtype != torch.uint8:
        raise ValueError(f"{path}: thumbnails must be uint8 [{n}, h, w, 3], got {thumbnails.dtype} "
                         f"{tuple(thumbnails.shape)}")
    if subgroup.shape != (n,) or (n and (int(subgroup.min()) < 0 or int(subgroup.max()) >= len(labels))):
        raise ValueError(f"{path}: subgroup must be [{n}] indices into the {len(labels)} labels")
    return FeatureBank(features, thumbnails.numpy(), subgroup, labels)


def load_examples(directory: str | Path, notes: list[str] | None = None) -> list[Example]:
    """``examples/examples.json`` [{"file", "boxes", "caption"}] -> Examples (an absent folder gives none).

    With ``notes``, a damaged index or missing image files leave those examples out and say so there; without it
    they raise (for tools that must not ship a bundle with holes)."""
    directory = Path(directory)
    index = directory / EXAMPLES_INDEX
    if not index.is_file():
        return []
    try:
        entries = json.loads(index.read_text())
        examples = [Example(directory / e["file"], tuple(tuple(float(v) for v in b) for b in e["boxes"]),
                            str(e.get("caption", ""))) for e in entries]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        message = (f"{index}: expected [{{\"file\": ..., \"boxes\": [[xmin, ymin, xmax, ymax]], "
                   f"\"caption\": ...}}]: {err}")
        if notes is None:
            raise ValueError(message) from None
        notes.append(f"No examples: {message}")
        return []
    present = [example for example in examples if example.path.is_file()]
    missing = [example.path.name for example in examples if example not in present]
    if missing and notes is None:
        raise FileNotFoundError(f"{index} lists {missing[0]}, which is not in {directory}")
    if missing:
        notes.append(f"{index} lists {', '.join(missing)}, not in {directory}: those examples are left out.")
    readable, damaged = [], []
    for example in present:  # decoded now, and kept (a few small images): one cut short must not stop the app later
        try:
            pixels = example.image()
            pixels.flags.writeable = False
            readable.append(replace(example, pixels=pixels))
        except InputError as err:
            damaged.append(f"{example.path.name} ({err})")
    if damaged and notes is None:
        raise ValueError(f"an example in {directory} cannot be read: {damaged[0]}")
    if damaged:
        notes.append(f"Examples in {directory} that cannot be read are left out: {'; '.join(damaged)}")
    return readable



# ---------------------------------------------------------------------------------------------------------------------
# A random-weight bundle: exercises every path (tests, benchmarks, trying the app) without any training
# ---------------------------------------------------------------------------------------------------------------------

def _example_scene(width: int, height: int, rng: np.random.Generator) -> tuple[Image.Image, list[list[float]]]:
    """A gradient background with a few coloured shapes; the boxes cover two of the shapes."""
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    background = (top * (1 - yy[..., None]) + bottom * yy[..., None] + 20 * xx[..., None]).clip(0, 255)
    image = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    left, top_edge = (width - side) / 2, (height - side) / 2
    boxes = []
    for k in range(3):
        r = side * rng.uniform(0.10, 0.16)
        cx = left + side * (0.25 + 0.25 * k)
        cy = top_edge + side * rng.uniform(0.3, 0.7)
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if k % 2 == 0 else draw.rectangle)([cx - r, cy - r, cx + r, cy + r], fill=color)
        if k < 2:
            boxes.append([round(cx - r), round(cy - r), round(cx + r), round(cy + r)])
    return image, boxes


def build_random_bundle(directory: str | Path, config: IJepaConfig, decoder_kwargs: dict | None = None,
                        num_labels: int = 6, bank_size: int = 24, num_examples: int = 2, seed: int = 0) -> Path:
    """Write a complete bundle with random weights: model, both decoders (None: skip), probes, bank and examples.

    Nothing it shows means anything; it exists so the app, its tests and its benchmark run anywhere.
    """
    directory = Path(directory)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = IJepaConfig.from_dict({**config.to_dict(), "trained_on": "nothing (random weights, for testing)"})
    model = IJepa(config)
    save_model(model, directory / MODEL_DIR)
    if decoder_kwargs is not None:
        args = {"feature_dim": config.embed_dim, "grid_size": config.grid_size, "image_size": config.img_size,
                "model_signature": tuple(model.feature_signature()), **decoder_kwargs}
        for conditioning, name in DECODER_DIRS.items():
            SketchDecoder(**{**args, "conditioning": conditioning}).save_pretrained(directory / name)
            share_as_umask_allows(directory / name)
    dim = config.embed_dim
    labels = [f"label {i}" for i in range(num_labels)]
    signature = {"model_signature": model.feature_signature()}
    for name in PROBE_NAMES:
        state = {"mean": torch.randn(dim) * 0.1, "std": torch.rand(dim) + 0.5,
                 "linear.weight": torch.randn(num_labels, dim) * 0.2, "linear.bias": torch.zeros(num_labels)}
        save_safetensors(state, directory / f"probe_{name}.safetensors")
        (directory / f"probe_{name}.json").write_text(json.dumps({"labels": labels, **signature}) + "\n")
    save_safetensors({"features": torch.randn(bank_size, dim).half(),
                      "thumbnails": torch.from_numpy(rng.integers(0, 256, (bank_size, 16, 16, 3), dtype=np.uint8)),
                      "subgroup": torch.arange(bank_size) % num_labels}, directory / f"{BANK_NAME}.safetensors")
    (directory / f"{BANK_NAME}.json").write_text(json.dumps({"labels": labels, **signature}) + "\n")
    examples_dir = directory / EXAMPLES_DIR
    examples_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for k in range(num_examples):
        width, height = (256, 256) if k % 2 == 0 else (320, 240)
        image, boxes = _example_scene(width, height, rng)
        image.save(examples_dir / f"example_{k}.png")
        entries.append({"file": f"example_{k}.png", "boxes": boxes, "caption": f"Random shapes {k + 1}"})
    (examples_dir / EXAMPLES_INDEX).write_text(json.dumps(entries, indent=2) + "\n")
    return directory

