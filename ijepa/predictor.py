"""The I-JEPA predictor: a narrow ViT that reads context tokens and predicts target-block representations.

Parameter names match the official ``VisionTransformerPredictor`` (``predictor_embed``, ``mask_token``,
``predictor_pos_embed``, ``predictor_blocks.i.*``, ``predictor_norm``, ``predictor_proj``) for strict loading.
One forward predicts every target block: the context is repeated once per target mask.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from timm.layers import trunc_normal_

from .masks import apply_masks
from .pos_embed import position_table, sincos_2d
from .vision_transformer import block_output_rows, init_transformer_weights, make_blocks


class VisionTransformerPredictor(nn.Module):
    """Predictor. ``forward(context_tokens, context_masks, target_masks)`` -> predictions per target mask.

    Args:
        grid_size: (rows, cols) patch grid the mask indices refer to (other grids via ``grid_size=`` at run time).
        embed_dim: encoder width D (input and output width).
        predictor_embed_dim: internal width Dp (official: 384).
        depth, num_heads: predictor depth and heads (official: heads = encoder heads).
    """

    def __init__(self, grid_size: tuple[int, int] = (14, 14), embed_dim: int = 768, predictor_embed_dim: int = 384,
                 depth: int = 6, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, init_std: float = 0.02, rescale_residuals: bool = True):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.grid_size = tuple(grid_size)
        self.embed_dim = embed_dim
        self.predictor_embed_dim = predictor_embed_dim
        self.num_heads = num_heads
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        table = sincos_2d(predictor_embed_dim, self.grid_size).unsqueeze(0)
        self.predictor_pos_embed = nn.Parameter(table, requires_grad=False)
        self.predictor_blocks = make_blocks(predictor_embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                                            drop_path_rate, norm_layer)
        self.predictor_norm = norm_layer(predictor_embed_dim)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim, bias=True)
        init_transformer_weights(self, self.predictor_blocks, init_std, rescale_residuals)
        trunc_normal_(self.mask_token, std=init_std)
        # The last block computes the query rows only, since the context rows' outputs are thrown away (the same
        # predictions, ~3 % less work per training step). False runs every row through every block, as the
        # official code does: the throughput benchmark's stand-in for it.
        self.last_block_queries_only = True

    def forward(self, context_tokens: torch.Tensor, context_masks: list[torch.Tensor],
                target_masks: list[torch.Tensor], grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """context_tokens [len(context_masks) * B, Kc, D] -> [len(target_masks) * len(context_masks) * B, Kt, D].

        Output order is target-mask-major, matching ``apply_masks(targets, target_masks)`` when there is one
        context mask (the training case), so predictions and targets line up row for row.
        """
        num_ctx, num_tgt = len(context_masks), len(target_masks)
        batch = context_tokens.size(0) // num_ctx
        pos = position_table(self.predictor_pos_embed, self.grid_size, grid_size or self.grid_size)
        pos = pos.expand(batch, -1, -1)

        x = self.predictor_embed(context_tokens) + apply_masks(pos, context_masks)
        num_context_tokens = x.size(1)

        # Queries for each target block: mask token + the block's positions, one copy per context mask.
        target_pos = apply_masks(pos, target_masks)  # [num_tgt * B, Kt, Dp]
        target_pos = target_pos.view(num_tgt, 1, batch, *target_pos.shape[1:]).expand(-1, num_ctx, -1, -1, -1)
        queries = self.mask_token + target_pos.reshape(num_tgt * num_ctx * batch, *target_pos.shape[-2:])

        x = x.repeat(num_tgt, 1, 1)
        x = torch.cat([x, queries], dim=1)
        blocks = self.predictor_blocks
        cut = self.last_block_queries_only and len(blocks) > 0
        for block in blocks[:-1] if cut else blocks:
            x = block(x)
        x = block_output_rows(blocks[-1], x, queries.size(1)) if cut else x[:, num_context_tokens:]
        return self.predictor_proj(self.predictor_norm(x))


def vit_predictor(grid_size: tuple[int, int], embed_dim: int, **kwargs) -> VisionTransformerPredictor:
    """The predictor for an encoder of ``embed_dim`` on ``grid_size`` patches; other settings as the class's."""
    return VisionTransformerPredictor(grid_size=grid_size, embed_dim=embed_dim, **kwargs)
