"""Inference primitives shared by evaluation, decoder training, scripts and the app.

Everything here takes images in [0, 1] ([B, 3, H, W]) and patch-index masks, and returns features in the space
the predictor was trained in: per-token layer-normed target-encoder features ("true") and predictor outputs
("predicted"). Keeping one definition of that normalisation is what lets the decoder, the probe and the
nearest-neighbour bank be trained on truths and fed predictions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import apply_masks
from .model import IJepa


def layer_norm_features(features: torch.Tensor) -> torch.Tensor:
    """The affine-free per-token LayerNorm the I-JEPA targets go through."""
    return F.layer_norm(features, (features.size(-1),))


@torch.no_grad()
def encode(model: IJepa, images: torch.Tensor, which: str = "target") -> torch.Tensor:
    """Raw (un-normalised) features of every patch: [B, N, D], from the target encoder by default."""
    return model.feature_encoder(which)(model.normalize(images))


@torch.no_grad()
def true_features(model: IJepa, images: torch.Tensor) -> torch.Tensor:
    """Layer-normed target-encoder features of the full image, [B, N, D]: what the predictor is trained to match."""
    return layer_norm_features(model.target_encoder(model.normalize(images)))


@torch.no_grad()
def predict_features(model: IJepa, images: torch.Tensor, context_masks: torch.Tensor,
                     target_masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Predictor outputs for each target mask from the context only: list of [B, Kt, D].

    The predictor always reads CONTEXT-encoder tokens (what it was trained on), whatever encoder supplies
    display features.
    """
    if model.predictor is None:
        raise ValueError("this checkpoint has no predictor: predictions need an I-JEPA file with 'predictor' weights")
    context = model.encoder(model.normalize(images), [context_masks])
    batch = images.size(0)
    grid = model.encoder.grid_of(images)
    predictions = model.predictor(context, [context_masks], target_masks, grid_size=grid)
    return list(predictions.split(batch, dim=0))


def gather(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[B, N, D] features at [B, K] patch indices -> [B, K, D]."""
    return apply_masks(features, [indices])


def pooled(tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Average-pool [B, K, D] tokens (ignoring padded tokens where token_mask is False) -> [B, D]."""
    if token_mask is None:
        return tokens.mean(dim=1)
    weights = token_mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
