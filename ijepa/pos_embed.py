"""Fixed 2-D sine-cosine position tables, identical to the official I-JEPA ones, for any grid.

The official table is built in float64 with ``meshgrid(grid_w, grid_h)``, so the FIRST half of the channels
encodes the w (column) coordinate and the second half the h (row) coordinate; each half is concat(sin, cos)
with omega = 1 / 10000 ** (arange(D/4) / (D/4)). Because the table is a pure function of the grid, changing
resolution means regenerating it (exact), never interpolating a learned table (official issue #42).
"""
from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim] table, concat(sin, cos), computed in float64."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for a sin-cos table, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(embed_dim: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Table for a (rows, cols) grid in raster order -> float32 [rows * cols, embed_dim]."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos table, got {embed_dim}")
    rows, cols = grid_size
    h = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)  # row of each patch
    w = torch.arange(cols, dtype=torch.float64).repeat(rows)  # column of each patch
    table = torch.cat([sincos_1d(embed_dim // 2, w), sincos_1d(embed_dim // 2, h)], dim=1)
    return table.float()


def grid_for(num_patches: int) -> tuple[int, int]:
    """The square grid behind a stored table of ``num_patches`` rows (official tables are square)."""
    side = int(round(num_patches**0.5))
    if side * side != num_patches:
        raise ValueError(f"cannot infer a square patch grid from {num_patches} position embeddings")
    return side, side


def position_table(stored: torch.Tensor, stored_grid: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The stored [1, N, D] table when ``grid`` is the stored grid, else a regenerated table for ``grid``."""
    if tuple(grid) == tuple(stored_grid):
        return stored
    return sincos_2d(stored.shape[-1], grid).to(stored.device, stored.dtype).unsqueeze(0)
