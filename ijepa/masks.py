"""Patch-index masks: gathering tokens, multi-block sampling for training, and user boxes.

A mask is a LongTensor [B, K] of patch indices (raster order on the model grid) to KEEP, exactly as
in the official I-JEPA code, so masks from one place can be fed to the other.
"""
from __future__ import annotations

import torch


def apply_masks(x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """Gather the tokens each mask keeps: x [B, N, D], masks of [B, K] -> [len(masks) * B, K, D].

    Results are concatenated mask-major (all images for mask 0, then mask 1, ...), like the official code.
    """
    gathered = [torch.gather(x, 1, m.unsqueeze(-1).expand(-1, -1, x.size(-1))) for m in masks]
    return torch.cat(gathered, dim=0)
