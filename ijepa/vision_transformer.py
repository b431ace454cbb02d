"""The I-JEPA context/target encoder: a ViT without CLS token, built from timm blocks.

Module and parameter names are identical to the official release (``patch_embed.proj``, ``pos_embed``,
``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so official state dicts load with
``strict=True``. timm's ``Block``/``Attention`` use fused scaled-dot-product attention.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block

from .masks import apply_masks
from .pos_embed import position_table, sincos_2d

# Widths, depths and heads of the released families; heads cannot be read from weights, so this is the convention.
VIT_ARCHS: dict[str, dict] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_huge": dict(embed_dim=1280, depth=32, num_heads=16),
    "vit_giant": dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11),
}


def init_transformer_weights(module: nn.Module, blocks: nn.ModuleList, init_std: float,
                             rescale_residuals: bool = True) -> None:
    """The official model constructors' init: truncated-normal weights, zero biases, unit LayerNorms, and residual
    projections (attn.proj, mlp.fc2) of block i scaled by 1/sqrt(2 * (i + 1)). The official training script then
    redraws every Linear (its ``init_model``), undoing that scaling: ``rescale_residuals=False`` is that init."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for layer_id, block in enumerate(blocks if rescale_residuals else (), start=1):
        block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer_id))
        block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer_id))


def make_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path_rate: float,
                norm_layer) -> nn.ModuleList:
    """timm transformer blocks with a linearly increasing stochastic-depth rate, as in the official code."""
    rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth > 1 else [drop_path_rate] * depth
    return nn.ModuleList(
        Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rate,
              norm_layer=norm_layer)
        for rate in rates
    )


def block_output_rows(block: Block, x: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``block(x)[:, -num_rows:]``, computing only those rows: every row is still a key and a value, but only the
    last ``num_rows`` are queries and go through the projection and the MLP.

    Why: the predictor throws its last block's context rows away, and computing them is ~3 % of a training step
    (bench/RESULTS.md). For the blocks ``make_blocks`` builds (no attention gate; dropouts off in training).
    """
    attn = block.attn
    b, n, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q[:, :, n - num_rows:]), attn.k_norm(k)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        out = attn.attn_drop((q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
    out = attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(b, num_rows, attn.attn_dim))))
    rows = x[:, n - num_rows:] + block.drop_path1(block.ls1(out))
    return rows + block.drop_path2(block.ls2(block.mlp(block.norm2(rows))))


class VisionTransformer(nn.Module):
    """ViT encoder. ``forward(images, masks)`` returns the tokens kept by each mask, mask-major.

    Args:
        img_size: training resolution; sets the stored position table (other sizes work at run time).
        patch_size: square patch side in pixels.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer shape (official defaults).
        drop_path_rate: stochastic depth at the last block.
        init_std, rescale_residuals: the truncated-normal init (``init_transformer_weights``).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, init_std: float = 0.02, rescale_residuals: bool = True):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, strict_img_size=False)
        self.grid_size = tuple(self.patch_embed.grid_size)
        table = sincos_2d(embed_dim, self.grid_size).unsqueeze(0)
        self.pos_embed = nn.Parameter(table, requires_grad=False)  # fixed, stored like the official one
        self.blocks = make_blocks(embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path_rate, norm_layer)
        self.norm = norm_layer(embed_dim)
        init_transformer_weights(self, self.blocks, init_std, rescale_residuals)

    def grid_of(self, images: torch.Tensor) -> tuple[int, int]:
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] (normalised) -> patch tokens with their position table added, [B, N, D]."""
        grid = self.grid_of(images)  # checks the size first, with a readable message
        return self.patch_embed(images) + position_table(self.pos_embed, self.grid_size, grid)

    def forward(self, images: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """images [B, C, H, W] (normalised) -> [B, N, D], or [len(masks) * B, K, D] with keep-index masks."""
        x = self.embed(images)
        if masks is not None:
            x = apply_masks(x, masks)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def block_outputs(self, images: torch.Tensor, last: int) -> list[torch.Tensor]:
        """The raw outputs [B, N, D] of the last ``last`` blocks for the full image (data2vec-style targets)."""
        if not 1 <= last <= len(self.blocks):
            raise ValueError(f"last must be 1..{len(self.blocks)}, got {last}")
        x = self.embed(images)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= len(self.blocks) - last:
                outputs.append(x)
        return outputs


def _create(arch: str, **kwargs) -> VisionTransformer:
    model_args = dict(VIT_ARCHS[arch])
    model_args.update(kwargs)  # caller kwargs win
    return VisionTransformer(**model_args)


def vit_tiny(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return _create("vit_tiny", patch_size=patch_size, **kwargs)


def vit_small(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return _create("vit_small", patch_size=patch_size, **kwargs)


def vit_base(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return _create("vit_base", patch_size=patch_size, **kwargs)


def vit_large(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return _create("vit_large", patch_size=patch_size, **kwargs)


def vit_huge(patch_size: int = 14, **kwargs) -> VisionTransformer:
    return _create("vit_huge", patch_size=patch_size, **kwargs)


def vit_giant(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return _create("vit_giant", patch_size=patch_size, **kwargs)


def set_fused_attention(module: nn.Module, enabled: bool) -> None:
    """Switch timm's fused SDPA attention on or off in every block below ``module``.

    Fused SDPA is the right choice on GPUs and for fp32 on CPUs; under CPU bf16 autocast its backward is 2-5x
    slower than plain ``softmax(q k^T) v`` attention (bench/RESULTS.md), so CPU bf16 training turns it off where a
    backward runs (``train.pretrain.set_training_attention``).
    """
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = enabled
