"""Patch-index masks: gathering tokens, multi-block sampling for training, and patch rectangles.

User boxes become masks in ``ijepa/boxes.py``.

A mask is a LongTensor [B, K] of patch indices (raster order on the model grid) to KEEP, exactly as
in the official I-JEPA code, so masks from one place can be fed to the other.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch



def apply_masks(x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """Gather the tokens each mask keeps: x [B, N, D], masks of [B, K] -> [len(masks) * B, K, D].

    Results are concatenated mask-major (all images for mask 0, then mask 1, ...), like the official code.
    """
    gathered = [torch.gather(x, 1, m.unsqueeze(-1).expand(-1, -1, x.size(-1))) for m in masks]
    return torch.cat(gathered, dim=0)


def pooled(tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Average-pool [B, K, D] tokens (ignoring padded tokens where token_mask is False) -> [B, D]. Boxes of different
    sizes gather to different K; batched, they are padded to the longest and the mask says which tokens are real."""
    if token_mask is None:
        return tokens.mean(dim=1)
    weights = token_mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Multi-block mask sampling for pretraining
# ---------------------------------------------------------------------------------------------------------------------

logger = logging.getLogger(__name__)

GridSize = Union[int, Tuple[int, int]]

# Bounded effort before the deterministic fallbacks take over (see MultiBlockMaskGenerator.sample_maps).
_CONTEXT_RETRIES = 20


@dataclass(frozen=True)
class MaskConfig:
    """Multi-block masking hyper-parameters; the defaults are the official I-JEPA ones.

    Scales are fractions of the patch grid; aspect ratios are block height / width. An image's context keeps more
    than ``min_keep`` patches (the official rule, ``len(mask) > min_keep``; the official collator also redraws
    target blocks that small, which never happens at its scales and would loop forever on small grids, so targets
    are not held to it here). ``official_quirks`` reproduces the official collator's sampling
    (blocks never touch the last row/column, one random draw for scale and aspect, raster-prefix truncation);
    its unbounded retry loop is replaced by the same bounded fallbacks as the default mode.
    """

    num_targets: int = 4
    target_scale: Tuple[float, float] = (0.15, 0.2)
    target_aspect: Tuple[float, float] = (0.75, 1.5)
    context_scale: Tuple[float, float] = (0.85, 1.0)
    context_aspect: Tuple[float, float] = (1.0, 1.0)
    min_keep: int = 10
    allow_overlap: bool = False
    official_quirks: bool = False

    def __post_init__(self) -> None:
        if self.num_targets < 1:
            raise ValueError(f"num_targets must be >= 1, got {self.num_targets}")
        if self.min_keep < 1:
            raise ValueError(f"min_keep must be >= 1, got {self.min_keep}")
        for name in ("target_scale", "context_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {(lo, hi)}")
        for name in ("target_aspect", "context_aspect"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(lo, hi)}")


def as_grid(grid_size: GridSize) -> Tuple[int, int]:
    """Normalise an int or (h, w) grid size and check it."""
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else (int(grid_size[0]), int(grid_size[1]))
    if gh < 1 or gw < 1:
        raise ValueError(f"grid_size must be positive (height, width), got {grid_size}")
    return gh, gw


def _range_miss(log_values: torch.Tensor, bounds: Tuple[float, float], tol: float) -> torch.Tensor:
    """How far (in log space) each value lies outside [bounds[0], bounds[1]]; 0 inside."""
    below = (math.log(bounds[0]) - tol - log_values).clamp_min(0)
    above = (log_values - math.log(bounds[1]) - tol).clamp_min(0)
    return below + above


class _BlockSizeTable:
    """All integer block sizes (h, w) that fit the grid, reduced to those closest to a scale/aspect range.

    A drawn (scale, aspect) is mapped to the nearest eligible size in log space. Eligible sizes are the ones inside
    both ranges when any exists (always the case for the defaults on grids from 8x8 up); otherwise the ones nearest
    to the ranges, so a request the grid cannot honour degrades to the closest block instead of failing.
    """

    def __init__(self, grid: Tuple[int, int], scale: Tuple[float, float], aspect: Tuple[float, float]) -> None:
        gh, gw = grid
        h, w = torch.meshgrid(torch.arange(1, gh + 1, dtype=torch.float64),
                              torch.arange(1, gw + 1, dtype=torch.float64), indexing="ij")
        h, w = h.flatten(), w.flatten()
        log_scale, log_aspect = torch.log(h * w / (gh * gw)), torch.log(h / w)
        tol = 1e-9  # keep sizes that sit exactly on a range edge despite rounding in log()
        miss = _range_miss(log_scale, scale, tol).square() + _range_miss(log_aspect, aspect, tol).square()
        eligible = miss <= miss.min() + 1e-12
        self.heights, self.widths = h[eligible].long(), w[eligible].long()
        self.log_scales, self.log_aspects = log_scale[eligible], log_aspect[eligible]
        self.in_range = bool(miss.min() == 0)
        self.scale, self.aspect = scale, aspect

    def areas(self) -> torch.Tensor:
        return self.heights * self.widths

    def draw(self, generator: torch.Generator) -> Tuple[int, int]:
        """Draw scale and aspect independently (uniform in their ranges) and return the nearest eligible (h, w)."""
        u = torch.rand(2, generator=generator, dtype=torch.float64)
        s = self.scale[0] + u[0] * (self.scale[1] - self.scale[0])
        a = self.aspect[0] + u[1] * (self.aspect[1] - self.aspect[0])
        dist = (self.log_scales - torch.log(s)).square() + (self.log_aspects - torch.log(a)).square()
        i = int(torch.argmin(dist))
        return int(self.heights[i]), int(self.widths[i])


def _official_block_size(u: float, grid: Tuple[int, int], scale: Tuple[float, float],
                         aspect: Tuple[float, float]) -> Tuple[int, int]:
    """The official size rule: one uniform u sets both scale and aspect; sides capped at grid - 1."""
    gh, gw = grid
    area = int(gh * gw * (scale[0] + u * (scale[1] - scale[0])))
    ratio = aspect[0] + u * (aspect[1] - aspect[0])
    h = min(max(round(math.sqrt(area * ratio)), 1), gh - 1)
    w = min(max(round(math.sqrt(area / ratio)), 1), gw - 1)
    return h, w


class MultiBlockMaskGenerator:
    """Samples I-JEPA multi-block masks for a whole batch at once, in bounded time.

    One target block size and one context block size are drawn per batch (as in the official collator, so all
    target masks have the same length); positions are drawn per image and per block. Unless ``allow_overlap``,
    target patches are removed from the context. An image whose context has ``min_keep`` patches or fewer gets new
    positions a bounded number of times, then (1) the context becomes every patch outside the targets, then
    (2) its targets are stacked onto the first target's position (with ``official_quirks`` the fallbacks also
    keep off the last row and column). ``__init__`` checks that (2) always leaves more than ``min_keep`` patches, so
    sampling never fails and never loops without bound.

    Context masks are brought to the batch's shortest length by keeping a random subset of each image's patches
    (sorted), not a raster-order prefix, unless ``official_quirks``.
    """

    def __init__(self, grid_size: GridSize, config: Optional[MaskConfig] = None) -> None:
        self.grid_size = as_grid(grid_size)
        self.config = config if config is not None else MaskConfig()
        gh, gw = self.grid_size
        self.num_patches = gh * gw
        cfg = self.config
        # Where blocks may lie; fallbacks stay inside it too. The official bound excludes the last row and column.
        region = torch.ones(gh, gw, dtype=torch.bool)
        if cfg.official_quirks:
            region[-1, :] = False
            region[:, -1] = False
        self._region = region.flatten()
        if cfg.official_quirks:
            if gh < 2 or gw < 2:
                raise ValueError(f"official_quirks needs a grid of at least 2x2 patches, got {self.grid_size}")
            us = [i / 1000 for i in range(1001)]
            target_areas = [h * w for h, w in (_official_block_size(u, self.grid_size, cfg.target_scale,
                                                                     cfg.target_aspect) for u in us)]
            context_areas = [h * w for h, w in (_official_block_size(u, self.grid_size, cfg.context_scale,
                                                                      cfg.context_aspect) for u in us)]
        else:
            self._target_sizes = _BlockSizeTable(self.grid_size, cfg.target_scale, cfg.target_aspect)
            self._context_sizes = _BlockSizeTable(self.grid_size, cfg.context_scale, cfg.context_aspect)
            if not self._target_sizes.in_range:
                logger.warning("No block on a %sx%s grid has a scale in %s and aspect in %s; using the closest.",
                               gh, gw, cfg.target_scale, cfg.target_aspect)
            target_areas = self._target_sizes.areas().tolist()
            context_areas = self._context_sizes.areas().tolist()
        if int(self._region.sum()) - max(target_areas) <= cfg.min_keep:
            raise ValueError(
                f"A target block of up to {max(target_areas)} patches on a {gh}x{gw} grid can leave no more than "
                f"min_keep={cfg.min_keep} context patches; lower target_scale or min_keep, or use a larger grid.")
        if cfg.allow_overlap and min(context_areas) <= cfg.min_keep:
            raise ValueError(
                f"A context block of {min(context_areas)} patches on a {gh}x{gw} grid is not above "
                f"min_keep={cfg.min_keep}; raise context_scale or lower min_keep.")

    def _draw_sizes(self, generator: torch.Generator) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        cfg = self.config
        if cfg.official_quirks:
            u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
            return (_official_block_size(u[0], self.grid_size, cfg.target_scale, cfg.target_aspect),
                    _official_block_size(u[1], self.grid_size, cfg.context_scale, cfg.context_aspect))
        return self._target_sizes.draw(generator), self._context_sizes.draw(generator)

    def _block_maps(self, size: Tuple[int, int], shape: Tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Boolean maps [*shape, N] of blocks of one size at random positions (all positions in one draw)."""
        (gh, gw), (h, w) = self.grid_size, size
        # The official exclusive bound keeps blocks off the last row and column.
        last = 0 if self.config.official_quirks else 1
        top = torch.randint(0, gh - h + last, shape, generator=generator)
        left = torch.randint(0, gw - w + last, shape, generator=generator)
        rows = torch.arange(gh)
        cols = torch.arange(gw)
        in_rows = (rows >= top.unsqueeze(-1)) & (rows < (top + h).unsqueeze(-1))
        in_cols = (cols >= left.unsqueeze(-1)) & (cols < (left + w).unsqueeze(-1))
        return (in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)).flatten(-2)

    def sample_maps(self, batch_size: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample boolean patch maps before equal-length truncation.

        Returns (context [B, N], targets [num_targets, B, N]). Useful for display and for checking the sampler.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        cfg = self.config
        b, t = batch_size, cfg.num_targets
        target_size, context_size = self._draw_sizes(generator)
        targets = self._block_maps(target_size, (b, t), generator)
        context = self._block_maps(context_size, (b,), generator)
        if cfg.allow_overlap:
            return context, targets.transpose(0, 1).contiguous()

        context = context & ~targets.any(dim=1)
        short = context.sum(-1) <= cfg.min_keep
        for _ in range(_CONTEXT_RETRIES):
            if not short.any():
                break
            new_targets = self._block_maps(target_size, (b, t), generator)
            new_context = self._block_maps(context_size, (b,), generator) & ~new_targets.any(dim=1)
            targets = torch.where(short[:, None, None], new_targets, targets)
            context = torch.where(short[:, None], new_context, context)
            short = context.sum(-1) <= cfg.min_keep
        if short.any():
            logger.debug("%d context masks not above min_keep after retries; using fallbacks", int(short.sum()))
            outside = self._region & ~targets.any(dim=1)
            context = torch.where(short[:, None], outside, context)
            short = context.sum(-1) <= cfg.min_keep
        if short.any():
            first = targets[:, :1].expand(-1, t, -1)
            targets = torch.where(short[:, None, None], first, targets)
            recovered = self._block_maps(context_size, (b,), generator) & ~first[:, 0]
            around = self._region & ~first[:, 0]
            recovered = torch.where(recovered.sum(-1, keepdim=True) > cfg.min_keep, recovered, around)
            context = torch.where(short[:, None], recovered, context)
        return context, targets.transpose(0, 1).contiguous()

    def _to_indices(self, maps: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
        """Sorted indices [B, length] from maps [B, N]: a random subset per row, or the raster prefix with quirks."""
        if not bool((maps.sum(-1) == length).all()):
            if self.config.official_quirks:
                maps = maps & (maps.cumsum(-1) <= length)
            else:
                rank = torch.rand(maps.shape, generator=generator).masked_fill(~maps, 2.0)
                keep = torch.topk(rank, length, dim=-1, largest=False).indices
                maps = torch.zeros_like(maps).scatter_(-1, keep, True)
        return maps.nonzero()[:, 1].view(maps.size(0), length)  # nonzero is row-major, so rows come out sorted

    def __call__(self, batch_size: int,
                 generator: torch.Generator) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Return (context_masks: [LongTensor [B, Kc]], target_masks: num_targets x LongTensor [B, Kt])."""
        context, targets = self.sample_maps(batch_size, generator)
        context_len = int(context.sum(-1).min())
        target_len = int(targets.sum(-1).min())
        context_masks = [self._to_indices(context, context_len, generator)]
        target_masks = [self._to_indices(m, target_len, generator) for m in targets]
        return context_masks, target_masks


def _mix_seed(seed: int, index: int) -> int:
    """Seed for one batch: distinct for every index under one seed (torch's CPU generator uses 32 bits)."""
    z = (seed + 0x9E3779B97F4A7C15) % 2**64  # splitmix64 finaliser spreads nearby seeds apart
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    z ^= z >> 31
    return (z + index) % 2**32


class MaskCollator:
    """DataLoader ``collate_fn`` that stacks images and samples multi-block masks.

    Masks are drawn from a fresh generator seeded by (seed, first item's index), so they depend only on which
    samples form the batch: not on the number of workers, their order, or whether training was resumed.
    Items are dicts with "image" [3, H, W] and "index"; other tensor values are stacked under their own key,
    other values are skipped.
    """

    _OUTPUT_KEYS = ("images", "indices", "context_masks", "target_masks")

    def __init__(self, grid_size: GridSize, config: Optional[MaskConfig] = None, seed: int = 0) -> None:
        self.mask_generator = MultiBlockMaskGenerator(grid_size, config)
        self.seed = int(seed)

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        if len(items) == 0:
            raise ValueError("MaskCollator got an empty batch")
        for key in ("image", "index"):
            if any(key not in item for item in items):
                raise ValueError(f"Every dataset item must be a dict with an '{key}' entry; got keys {list(items[0])}")
        batch: Dict[str, Any] = {
            "images": torch.stack([item["image"] for item in items]),
            "indices": torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
        }
        for key, value in items[0].items():
            if key in ("image", "index") or not isinstance(value, torch.Tensor):
                continue
            if key in self._OUTPUT_KEYS:
                raise ValueError(f"Dataset item key '{key}' clashes with a key MaskCollator produces; rename it")
            if any(not isinstance(item.get(key), torch.Tensor) for item in items):
                raise ValueError(f"Dataset item key '{key}' holds a tensor in some items but not in others")
            batch[key] = torch.stack([item[key] for item in items])

        generator = torch.Generator()
        generator.manual_seed(_mix_seed(self.seed, int(items[0]["index"])))
        batch["context_masks"], batch["target_masks"] = self.mask_generator(len(items), generator)
        return batch


def rectangle_indices(origins: torch.Tensor, rows: int, cols: int, grid_size: GridSize) -> torch.Tensor:
    """Patch rectangles of one shape at several places: origins [B, 2] as (row, col) -> [B, rows * cols]."""
    _, gw = as_grid(grid_size)
    dr, dc = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return ((origins[:, :1] + dr.flatten()) * gw + origins[:, 1:] + dc.flatten()).long()


def complement_indices(indices: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Every patch NOT in each row of ``indices`` [B, K] (equal K per row, no repeats) -> sorted [B, N - K]."""
    keep = torch.ones(indices.size(0), num_patches, dtype=torch.bool, device=indices.device)
    keep.scatter_(1, indices, False)
    return torch.nonzero(keep)[:, 1].view(indices.size(0), -1)
