"""Inference primitives shared by evaluation, decoder training, scripts and the app.

Everything here takes images in [0, 1] ([B, 3, H, W], or one [3, S, S] image for ``analyze_boxes`` and
``surprise_map``) and patch-index masks, and returns features in the space the predictor was trained in: per-token
layer-normed target-encoder features ("true") and predictor outputs ("predicted"). Keeping one definition of that
normalisation is what lets the decoder, the probe and the nearest-neighbour bank be trained on truths and fed
predictions.

Also here, for the app and scripts: decoding any user image file safely (``open_image``, ``to_rgb``), the
model's square view of it with the map from user pixels to model pixels (``prepare_image``; boxes follow it in
``ijepa/boxes.py``),
per-box predictions vs truth (``analyze_boxes``), the sliding-window ``surprise_map``, ``feature_pca``, the
linear-probe readout (``LinearReadout``) and ``nearest_neighbours`` in a feature bank.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .masks import apply_masks, complement_indices, rectangle_indices
from .model import IJepa, check_target


def layer_norm_features(features: torch.Tensor) -> torch.Tensor:
    """The affine-free per-token LayerNorm the I-JEPA targets go through."""
    return F.layer_norm(features, (features.size(-1),))


def instance_norm_tokens(features: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Normalise each feature over one image's tokens ([B, N, D]: mean 0, std 1 along N), as data2vec does to
    its targets: a component every token of an image shares (its background, say) no longer counts."""
    mean, var = features.mean(1, keepdim=True), features.var(1, keepdim=True, unbiased=False)
    return (features - mean) * torch.rsqrt(var + eps)


def target_features(target_encoder: nn.Module, images: torch.Tensor, norm: str = "layer",
                    layers: int = 1) -> torch.Tensor:
    """What the predictor must predict, for every patch of the full image: [B, N, D].

    ``norm="layer", layers=1`` is the paper's target: the last block's output through the encoder's final norm,
    then an affine-free per-token LayerNorm. ``norm="instance"`` normalises each feature over the image's tokens
    before that LayerNorm; ``layers=K`` (with ``"instance"``) averages the instance-normed outputs of the last K
    blocks first, as data2vec does (its end-of-block variant: each block's residual output; with K=1 the encoder's
    own final norm comes first, as in the paper's target). Both depart from the official objective, measured in
    bench/RESULTS.md ("Does what the predictor predicts matter?"); a model records its choice in
    ``IJepaConfig.target_norm/target_layers``.
    """
    check_target(norm, layers)
    if layers == 1:
        features = target_encoder(images)
        if norm == "instance":
            features = instance_norm_tokens(features.float())
    else:
        outputs = target_encoder.block_outputs(images, last=layers)
        features = torch.stack([instance_norm_tokens(o.float()) for o in outputs]).mean(0)
    return layer_norm_features(features)


@torch.no_grad()
def encode(model: IJepa, images: torch.Tensor, which: str = "target") -> torch.Tensor:
    """Raw (un-normalised) features of every patch: [B, N, D], from the target encoder by default."""
    return model.feature_encoder(which)(model.normalize(images))


@torch.no_grad()
def true_features(model: IJepa, images: torch.Tensor) -> torch.Tensor:
    """Normalised target-encoder features of the full image, [B, N, D]: what the predictor is trained to match
    (per-token layer-normed, after the model's own ``target_norm``/``target_layers``)."""
    return target_features(model.target_encoder, model.normalize(images), model.config.target_norm,
                           model.config.target_layers)


def require_predictor(model: IJepa, what: str) -> None:
    """ValueError unless the model has a predictor, which ``what`` needs."""
    if model.predictor is None:
        raise ValueError(f"{what}: this checkpoint has no predictor (use an I-JEPA file with 'predictor' weights)")


@torch.no_grad()
def predict_features(model: IJepa, images: torch.Tensor, context_masks: torch.Tensor,
                     target_masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Predictor outputs for each target mask from the context only: list of [B, Kt, D].

    The predictor always reads CONTEXT-encoder tokens (what it was trained on), whatever encoder supplies
    display features.
    """
    require_predictor(model, "predictions")
    context = model.encoder(model.normalize(images), [context_masks])
    batch = images.size(0)
    grid = model.encoder.grid_of(images)
    predictions = model.predictor(context, [context_masks], target_masks, grid_size=grid)
    return list(predictions.split(batch, dim=0))


def gather(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[B, N, D] features at [B, K] patch indices -> [B, K, D]."""
    return apply_masks(features, [indices])


# ---------------------------------------------------------------------------------------------------------------------
# Images: any common file -> the model's square view, with the map from the user's pixels to the model's
# ---------------------------------------------------------------------------------------------------------------------

# Images above this many pixels are refused before decoding (decompression bombs; a 50 MP photo is already rare).
MAX_IMAGE_PIXELS = 50_000_000
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def open_image(source: str | Path | bytes | BinaryIO, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and decode an image file, refusing anything that is not an image or is too large to decode safely.

    The pixel count is checked from the header, before any pixel is decoded. Raises InputError with a message
    meant for the person who supplied the file.
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():  # Pillow warns of sizes it still opens; the size check below refuses them
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except Image.DecompressionBombError:
        raise InputError(f"This image has far more pixels than the limit of {max_pixels / 1e6:.0f} megapixels; "
                         "resize it and upload it again.") from None
    except FileNotFoundError:
        raise InputError(f"No such image file: {source}") from None
    except UnidentifiedImageError:
        raise InputError("This file is not an image that can be read: use PNG, JPEG, WebP, GIF, BMP or TIFF.") from None
    except (OSError, SyntaxError) as err:
        raise InputError(f"This image file cannot be read; it may be damaged. Details: {err}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InputError(f"This image is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels); the limit "
                         f"is {max_pixels / 1e6:.0f} megapixels. Resize it and upload it again.")
    if width < 1 or height < 1:
        raise InputError(f"This image has no pixels ({width}x{height}).")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"This image file is damaged or truncated and cannot be decoded. Details: {err}") from None
    return image


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer or float greyscale -> 8-bit "L", scaling the full range instead of clipping at 255."""
    values = np.asarray(image).astype(np.float64)
    if image.mode in _SIXTEEN_BIT_MODES:
        low, high = 0.0, 65535.0
    elif image.mode == "F":
        finite = values[np.isfinite(values)]
        low, high = (0.0, 1.0) if finite.size == 0 else (float(finite.min()), float(finite.max()))
        if low >= 0.0 and high <= 1.0:
            low, high = 0.0, 1.0
    else:  # "I": 32-bit ints, usually a 16-bit source widened by the decoder
        top = float(values.max(initial=0))
        low, high = 0.0, 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    scaled = (np.nan_to_num(values, nan=low) - low) / max(high - low, 1e-12)
    return Image.fromarray(np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image | np.ndarray, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL image (or uint8/uint16/float array) -> upright 8-bit RGB.

    EXIF rotation is applied (the way browsers show photos, so boxes drawn on screen line up); transparency is
    composited onto ``background``; 16-bit and float images are scaled to 8 bits; palette, CMYK, LAB, etc. are
    converted by Pillow.
    """
    if isinstance(image, np.ndarray):
        image = array_to_image(image)
    if image.getexif().get(0x0112, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _high_bit_depth_to_l(image)
    has_alpha = image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def array_to_image(array: np.ndarray) -> Image.Image:
    """[H, W], [H, W, 3] or [H, W, 4] arrays (uint8, uint16, or float in [0, 1]) -> PIL image."""
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise InputError(f"an image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {array.shape}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.dtype == np.uint16 and array.ndim == 2:
        return Image.fromarray(array, mode="I;16")
    if array.dtype == np.uint16:
        array = np.round(array / 257.0)
    elif np.issubdtype(array.dtype, np.floating):
        top = float(np.nanmax(array, initial=0.0, where=np.isfinite(array)))
        if top > 1.0 + 1e-3:  # 0-255 values in a float array would all read as white
            raise InputError(f"a float image array must hold values in [0, 1], got up to {top:g}: divide it by 255 "
                             "or pass uint8")
        array = np.round(np.clip(np.nan_to_num(array), 0, 1) * 255)
    elif array.dtype != np.uint8:
        raise InputError(f"unsupported image array dtype {array.dtype}: use uint8, uint16 or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)))


@dataclass(frozen=True)
class PreparedImage:
    """The model's view of a user image: the centre square, resized to the model's resolution.

    Attributes:
        pixels: [3, S, S] float32 in [0, 1], what the encoders see (before normalisation).
        source_size: (width, height) of the upright user image that boxes refer to.
        crop: (left, top, side) of the centre square in user-image pixels.
    """

    pixels: torch.Tensor
    source_size: tuple[int, int]
    crop: tuple[float, float, float]

    @property
    def size(self) -> int:
        return self.pixels.size(-1)

    @property
    def scale(self) -> float:
        """Model pixels per user-image pixel."""
        return self.size / self.crop[2]

    def to_uint8(self) -> np.ndarray:
        """[S, S, 3] uint8, exactly the pixels the model saw."""
        return np.round(self.pixels.permute(1, 2, 0).numpy() * 255).astype(np.uint8)

    def to_model(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """A user-image box (xmin, ymin, xmax, ymax) -> the same box in model pixels (not clipped)."""
        left, top, _ = self.crop
        x0, y0, x1, y1 = box
        s = self.scale
        return (x0 - left) * s, (y0 - top) * s, (x1 - left) * s, (y1 - top) * s

    def to_source(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """A model-pixel box -> user-image pixels (inverse of ``to_model``)."""
        left, top, _ = self.crop
        x0, y0, x1, y1 = box
        s = self.scale
        return x0 / s + left, y0 / s + top, x1 / s + left, y1 / s + top


def centre_square(width: int, height: int) -> tuple[int, int, int]:
    """(left, top, side) of the square at an image's centre: the part the model reads."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


def prepare_image(image: Image.Image | np.ndarray, size: int) -> PreparedImage:
    """Upright RGB, centre square, resized to ``size`` x ``size`` by area (each model pixel averages the image
    pixels it covers; enlarged, it repeats them).

    The area filter keeps what is under a box out of the patches the model sees: bicubic reaches two image pixels
    beyond a model pixel (over a whole patch for a small image being enlarged), so pixels inside a box changed the
    context. An example scene saved at 4x with nearest-neighbour comes back exactly as it was rendered.
    Boxes in the user's pixels map to the model's with ``PreparedImage.to_model``.
    """
    rgb = to_rgb(image)
    width, height = rgb.size
    left, top, side = centre_square(width, height)
    # Crop first: resizing with Pillow's box= argument would blend pixels from outside the square into its border.
    square = rgb.crop((left, top, left + side, top + side))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BOX)
    pixels = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    return PreparedImage(pixels=pixels, source_size=(width, height), crop=(float(left), float(top), float(side)))


# ---------------------------------------------------------------------------------------------------------------------
# Boxes: what the predictor guesses vs what the target encoder sees
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class BoxPrediction:
    """One hidden box: its patches, the predictor's guess and the truth, all in layer-normed feature space."""

    target_indices: torch.Tensor  # [K] raster patch indices
    predicted: torch.Tensor  # [K, D] predictor outputs from the context only
    true: torch.Tensor  # [K, D] layer-normed target-encoder features of the full image
    errors: torch.Tensor  # [K] mean squared error per patch
    # [K] the error of a guess that needs no predictor: the average true feature of the visible patches. Features
    # share a large common part, so this, not zeros (which scores 1.0), is the bar a prediction has to clear.
    baseline_errors: torch.Tensor

    @property
    def error(self) -> float:
        """Mean per-patch squared error over the box."""
        return float(self.errors.mean())

    @property
    def baseline_error(self) -> float:
        """Mean per-patch error of guessing the visible patches' average feature for every hidden patch."""
        return float(self.baseline_errors.mean())

    @property
    def pooled_predicted(self) -> torch.Tensor:
        return self.predicted.mean(dim=0)

    @property
    def pooled_true(self) -> torch.Tensor:
        return self.true.mean(dim=0)


@dataclass
class BoxAnalysis:
    """The predictor's view of one image with some boxes hidden.

    ``context_indices`` are the patches the context encoder saw (every patch outside all boxes);
    ``true_features`` [N, D] are the layer-normed target features of the whole image.
    """

    context_indices: torch.Tensor
    boxes: list[BoxPrediction]
    true_features: torch.Tensor
    grid_size: tuple[int, int]


def per_patch_error(predicted: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the feature dimension: [..., K, D] x2 -> [..., K].

    Layer-normed targets have zero mean and unit variance per token, so 1.0 is the error of guessing zeros; the
    features share a large common part, so a guess of their average already scores far lower (``baseline_errors``).
    """
    return (predicted.float() - true.float()).pow(2).mean(dim=-1)


@torch.no_grad()
def analyze_boxes(model: IJepa, image: torch.Tensor, context_indices: torch.Tensor,
                  target_indices: Sequence[torch.Tensor]) -> BoxAnalysis:
    """Hide each target box, predict it from the shared context, and compare with the truth.

    Args:
        image: [3, S, S] (or [1, 3, S, S]) in [0, 1].
        context_indices: [Kc] patches the context encoder sees (outside every box).
        target_indices: one [K_i] index tensor per box.

    The context is encoded once; the predictor runs once per box (boxes may differ in size).
    """
    require_predictor(model, "predictions")
    if len(target_indices) == 0:
        raise ValueError("analyze_boxes needs at least one target box")
    images = image.unsqueeze(0) if image.dim() == 3 else image
    if images.size(0) != 1:
        raise ValueError(f"analyze_boxes takes one image, got a batch of {images.size(0)}")
    device = next(model.parameters()).device
    images = images.to(device)
    grid = model.encoder.grid_of(images)
    truth = true_features(model, images)[0]
    context = context_indices.to(device).unsqueeze(0)
    context_tokens = model.encoder(model.normalize(images), [context])
    visible_average = truth[context[0]].float().mean(dim=0, keepdim=True)
    boxes = []
    for target in target_indices:
        target = target.to(device)
        predicted = model.predictor(context_tokens, [context], [target.unsqueeze(0)], grid_size=grid)[0]
        true = truth[target]
        boxes.append(BoxPrediction(target.cpu(), predicted.float().cpu(), true.float().cpu(),
                                   per_patch_error(predicted, true).cpu(),
                                   per_patch_error(visible_average.expand_as(true), true).cpu()))
    return BoxAnalysis(context_indices.cpu(), boxes, truth.float().cpu(), grid)


def default_window(grid_size: tuple[int, int]) -> int:
    """The surprise map's window side when none is given: a quarter of the grid's shorter side, at least a patch."""
    return max(1, min(grid_size) // 4)


def window_positions(grid_size: tuple[int, int], window: tuple[int, int], stride: int) -> list[tuple[int, int]]:
    """Top-left (row, col) of every window position, stepping by ``stride`` (capped at the window side, so no
    patch is skipped) and always reaching the far edges."""
    gh, gw = grid_size
    wh, ww = window

    def starts(extent: int, length: int) -> list[int]:
        values = list(range(0, extent - length + 1, max(1, min(stride, length))))
        if values[-1] != extent - length:
            values.append(extent - length)
        return values

    return [(r, c) for r in starts(gh, wh) for c in starts(gw, ww)]


@torch.no_grad()
def surprise_map(model: IJepa, image: torch.Tensor, window: int | tuple[int, int] | None = None,
                 stride: int | None = None, batch_size: int = 64) -> torch.Tensor:
    """How hard each region is to predict from its surroundings: [gh, gw] mean per-patch squared error.

    A window of patches slides over the image; at each position the window is hidden, predicted from every
    other patch, and compared with the layer-normed target features. A patch's value is the error averaged
    over the windows that covered it. All positions run batched (``batch_size`` per forward).

    Args:
        window: window side(s) in patches; default a quarter of the grid side.
        stride: step in patches; default half the window (every patch is still covered).
    """
    require_predictor(model, "the surprise map")
    images = image.unsqueeze(0) if image.dim() == 3 else image
    device = next(model.parameters()).device
    images = images.to(device)
    gh, gw = model.encoder.grid_of(images)
    if window is None:
        window = default_window((gh, gw))
    wh, ww = (window, window) if isinstance(window, int) else window
    if not (1 <= wh <= gh and 1 <= ww <= gw) or wh * ww >= gh * gw:
        raise ValueError(f"window {wh}x{ww} patches must fit in the {gh}x{gw} grid and leave some context")
    stride = max(1, stride if stride is not None else min(wh, ww) // 2)
    positions = window_positions((gh, gw), (wh, ww), stride)
    targets = rectangle_indices(torch.tensor(positions), wh, ww, (gh, gw))  # [P, wh * ww], sorted
    contexts = complement_indices(targets, gh * gw).to(device)
    targets = targets.to(device)
    truth = true_features(model, images)  # [1, N, D]
    normalized = model.normalize(images)
    total = torch.zeros(gh * gw, dtype=torch.float64)
    count = torch.zeros(gh * gw, dtype=torch.float64)
    for start in range(0, len(positions), batch_size):
        ctx, tgt = contexts[start:start + batch_size], targets[start:start + batch_size]
        batch = ctx.size(0)
        tokens = model.encoder(normalized.expand(batch, -1, -1, -1), [ctx])
        predicted = model.predictor(tokens, [ctx], [tgt], grid_size=(gh, gw))
        # to the CPU before float64: MPS has none
        errors = per_patch_error(predicted, gather(truth.expand(batch, -1, -1), tgt)).cpu().double()
        total.index_add_(0, tgt.flatten().cpu(), errors.flatten())
        count.index_add_(0, tgt.flatten().cpu(), torch.ones_like(errors.flatten()))
    return (total / count.clamp_min(1)).float().view(gh, gw)


def feature_pca(features: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Patch features [N, D] -> [gh, gw, 3] in [0, 1]: the top three principal components as RGB.

    Each component is min-max scaled; signs are fixed (largest loading positive) so results are reproducible.
    """
    gh, gw = grid_size
    if features.dim() != 2 or features.size(0) != gh * gw:
        raise ValueError(f"features must be [N={gh * gw}, D], got {tuple(features.shape)}")
    centred = features.double() - features.double().mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:3]
    if components.size(0) < 3:
        components = torch.cat([components, components.new_zeros(3 - components.size(0), components.size(1))])
    signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    projected = centred @ (components * signs.masked_fill(signs == 0, 1)).T  # [N, 3]
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    scaled = (projected - low) / (high - low).clamp_min(1e-12)
    return scaled.float().view(gh, gw, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Reading predictions out: a linear probe and a bank of labelled box features
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LinearReadout:
    """A linear probe trained on TRUE pooled box features (``train.eval.save_probe`` format): standardise, then
    one linear layer, then softmax over ``labels``."""

    mean: torch.Tensor  # [D]
    std: torch.Tensor  # [D]
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    labels: tuple[str, ...]

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], labels: Sequence[str]) -> "LinearReadout":
        missing = [k for k in ("mean", "std", "linear.weight", "linear.bias") if k not in state]
        if missing:
            raise ValueError(f"a probe needs tensors mean, std, linear.weight, linear.bias; missing {missing}")
        weight = state["linear.weight"].float()
        if weight.size(0) != len(labels):
            raise ValueError(f"the probe has {weight.size(0)} outputs but {len(labels)} label names")
        dim, classes = weight.size(1), weight.size(0)
        if state["mean"].numel() != dim or state["std"].numel() != dim or state["linear.bias"].numel() != classes:
            raise ValueError(f"the probe's tensors have inconsistent shapes: weight {tuple(weight.shape)}, mean "
                             f"{tuple(state['mean'].shape)}, std {tuple(state['std'].shape)}, bias "
                             f"{tuple(state['linear.bias'].shape)}")
        return cls(state["mean"].float(), state["std"].float(), weight, state["linear.bias"].float(), tuple(labels))

    @property
    def dim(self) -> int:
        return self.weight.size(1)

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """[..., D] pooled features -> [..., C] class probabilities."""
        standardised = (features.float() - self.mean) / self.std
        return torch.softmax(standardised @ self.weight.T + self.bias, dim=-1)

    def top_k(self, features: torch.Tensor, k: int = 5) -> list[tuple[str, float]]:
        """The k most likely labels for one pooled feature vector [D], with probabilities."""
        probs = self.probabilities(features.reshape(-1))
        values, indices = probs.topk(min(k, probs.numel()))
        return [(self.labels[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]


def nearest_neighbours(bank: torch.Tensor, query: torch.Tensor, k: int = 8, centre: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine nearest neighbours of query [D] (or [B, D]) among bank [n, D]: (indices, similarities), [.., k].

    ``centre`` [D] is subtracted from both sides first: I-JEPA box features share a large common direction, so
    raw cosines all sit near 0.9 and say little; centred on the bank's mean they spread out."""
    if bank.dim() != 2 or query.size(-1) != bank.size(1):
        raise ValueError(f"bank must be [n, D] and query [..., D] with the same D; got {tuple(bank.shape)} and "
                         f"{tuple(query.shape)}")
    bank, query = bank.float(), query.float()
    if centre is not None:
        bank, query = bank - centre.float(), query - centre.float()
    sims = F.normalize(query, dim=-1) @ F.normalize(bank, dim=-1).T
    values, indices = sims.topk(min(k, bank.size(0)), dim=-1)
    return indices, values
