"""The I-JEPA model bundle: context encoder, EMA target encoder and predictor, rebuilt from one config.

Attribute names (``encoder``, ``target_encoder``, ``predictor``) are the official checkpoint's top-level keys, so
``IJepa.state_dict()`` keys read like the official file without the DDP ``module.`` prefix.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .pos_embed import sincos_2d
from .predictor import VisionTransformerPredictor
from .vision_transformer import VIT_ARCHS, VisionTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_target(norm: str, layers: int) -> None:
    """The target choices that exist (``ijepa.inference.target_features`` computes them), with a readable error."""
    if norm not in ("layer", "instance"):
        raise ValueError(f"target_norm must be 'layer' or 'instance', got {norm!r}")
    if layers < 1:
        raise ValueError(f"target_layers must be at least 1, got {layers}")
    if layers > 1 and norm != "instance":
        raise ValueError("target_layers > 1 averages blocks of different scales: it needs target_norm 'instance'")


@dataclass
class IJepaConfig:
    """Everything needed to rebuild the networks, plus what a user should know about them."""

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    predictor_embed_dim: int = 384
    predictor_depth: int = 6
    predictor_num_heads: int = 12
    predictor_mlp_ratio: float = 4.0  # the official predictor's, whatever the encoder's (ViT-g: 48/11)
    has_predictor: bool = True
    # what the predictor was trained to match: "layer" = the paper's per-token LayerNorm of the last block;
    # "instance" normalises each feature over the image's tokens first; target_layers > 1 averages the last blocks
    target_norm: str = "layer"
    target_layers: int = 1
    arch: str = ""
    trained_on: str = ""
    # the built-in emoji world's catalog (its base ids and held-out split) the model trained on, "" if none or
    # unknown: held-out figures mean something only where the evaluating machine's catalog is the same
    data_fingerprint: str = ""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        """Refuses settings no network can be built from, with the setting's name (a model folder's config.json
        edited by hand, a flag): they would otherwise fail deep in timm with a ZeroDivisionError or an assert."""
        sizes = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "predictor_embed_dim",
                 "predictor_depth", "predictor_num_heads")
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")
        for name in ("mlp_ratio", "predictor_mlp_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        for width, heads in (("embed_dim", "num_heads"), ("predictor_embed_dim", "predictor_num_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"{width} ({getattr(self, width)}) must be a multiple of {heads} "
                                 f"({getattr(self, heads)})")
        check_target(self.target_norm, self.target_layers)
        if self.target_layers > self.depth:
            raise ValueError(f"target_layers must be 1..depth ({self.depth}), got {self.target_layers}")

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.img_size // self.patch_size
        return side, side

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "IJepaConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown I-JEPA config fields: {unknown[:5]}")
        data = dict(data)
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    @classmethod
    def from_arch(cls, arch: str, **kwargs) -> "IJepaConfig":
        """A config for a named family (``vit_tiny`` ... ``vit_giant``); kwargs override."""
        if arch not in VIT_ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(VIT_ARCHS)}")
        args = dict(VIT_ARCHS[arch], arch=arch)
        args.setdefault("predictor_num_heads", args["num_heads"])
        args.update(kwargs)
        return cls(**args)


def build_encoder(config: IJepaConfig, rescale_residuals: bool = True) -> VisionTransformer:
    return VisionTransformer(img_size=config.img_size, patch_size=config.patch_size, embed_dim=config.embed_dim,
                             depth=config.depth, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
                             rescale_residuals=rescale_residuals)


def build_predictor(config: IJepaConfig, rescale_residuals: bool = True) -> VisionTransformerPredictor:
    return VisionTransformerPredictor(grid_size=config.grid_size, embed_dim=config.embed_dim,
                                      predictor_embed_dim=config.predictor_embed_dim, depth=config.predictor_depth,
                                      num_heads=config.predictor_num_heads, mlp_ratio=config.predictor_mlp_ratio,
                                      rescale_residuals=rescale_residuals)


class IJepa(nn.Module):
    """Context encoder + target encoder (an EMA copy) + predictor.

    Features for evaluation and display come from the TARGET encoder by default, as the paper evaluates; the
    predictor always reads CONTEXT-encoder tokens, because that is what it was trained on.
    ``rescale_residuals`` only shapes fresh weights (``init_transformer_weights``); loaded ones replace them.
    """

    def __init__(self, config: IJepaConfig, rescale_residuals: bool = True):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config, rescale_residuals)
        self.target_encoder = copy.deepcopy(self.encoder)
        for p in self.target_encoder.parameters():
            p.requires_grad_(False)
        self.predictor = build_predictor(config, rescale_residuals) if config.has_predictor else None
        self._pixel_stats: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # normalize's, per device and dtype

    def feature_encoder(self, which: str = "target") -> VisionTransformer:
        """The encoder that supplies features: "target" (default, as the paper evaluates) or "context"."""
        if which not in ("target", "context"):
            raise ValueError(f"features must come from 'target' or 'context', got {which!r}")
        return self.target_encoder if which == "target" else self.encoder

    def set_img_size(self, img_size: int) -> None:
        """Run at another resolution: regenerate every fixed sin-cos table for the new grid (exact)."""
        if img_size % self.config.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {self.config.patch_size}")
        self.config.img_size = img_size
        grid = self.config.grid_size
        for enc in (self.encoder, self.target_encoder):
            enc.pos_embed.data = sincos_2d(enc.embed_dim, grid).unsqueeze(0).to(enc.pos_embed)
            enc.grid_size = grid
            enc.patch_embed.img_size = (img_size, img_size)
            enc.patch_embed.grid_size = grid
            enc.patch_embed.num_patches = grid[0] * grid[1]
        if self.predictor is not None:
            pred = self.predictor
            table = sincos_2d(pred.predictor_embed_dim, grid).unsqueeze(0).to(pred.predictor_pos_embed)
            pred.predictor_pos_embed.data = table
            pred.grid_size = grid

    @torch.no_grad()
    def feature_signature(self) -> list[float]:
        """Identifies the feature space a sketch decoder learnt, beyond its shapes: two ViT-H/14 (IN-1K, IN-22K)
        share every shape but not these norms of the layers that write the true and predicted tokens. Rounded
        to 6 significant digits; ``load_decoder`` compares them with a tolerance an fp16 copy of the model passes."""
        layers = [self.target_encoder.norm.weight, self.target_encoder.norm.bias]
        if self.predictor is not None:
            layers.append(self.predictor.predictor_proj.weight)
        return [float(f"{float(p.float().norm()):.6g}") for p in layers]

    def has_signature(self, signature) -> bool:
        """Whether a stored ``feature_signature`` is this model's, up to the rounding of an fp16 copy."""
        mine = self.feature_signature()
        return len(signature) == len(mine) and torch.allclose(torch.tensor(list(signature), dtype=torch.float64),
                                                              torch.tensor(mine, dtype=torch.float64), rtol=1e-3)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images in [0, 1] -> the normalised input the encoders expect. The mean and std are made once
        per device and dtype: made from the config's lists at every step, each would be a copy from the host that
        on a GPU waits for all queued work (two host syncs per training step)."""
        key = (images.device, images.dtype, tuple(self.config.mean), tuple(self.config.std))
        if key not in self._pixel_stats:
            self._pixel_stats[key] = tuple(torch.tensor(values, dtype=images.dtype).view(1, 3, 1, 1).to(images.device)
                                           for values in (self.config.mean, self.config.std))
        mean, std = self._pixel_stats[key]
        return (images - mean) / std
