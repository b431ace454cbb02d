"""RCDM-style pixel-space diffusion decoder conditioned on I-JEPA predictor outputs for one target box.

The decoder answers "what does the predictor expect in this box?" by sampling images whose box region is
consistent with the predicted features. It wraps a diffusers ``UNet2DModel`` and adds two conditioning paths:

* pooled (RCDM, Bordes et al. 2022; the I-JEPA paper's visualisation): the average-pool of the predicted
  tokens goes through a small MLP to ``4 * block_out_channels[0]`` and is ADDED to the timestep embedding
  (``class_embed_type="identity"``); with ``resnet_time_scale_shift="scale_shift"`` every ResNet block then
  scales and shifts its GroupNorm output with it, as RCDM does.
* spatial_context (ours): the pooled path, plus the per-patch predicted tokens scattered onto the patch grid,
  projected by a 1x1 conv to ``feature_channels`` and upsampled (nearest) to pixels, plus the visible context
  (image with the box blanked to 0) and the box mask, all concatenated to the noisy input:
  ``concat(noisy 3, context 3, box mask 1, feature map C)``.

Conventions:
* Every image tensor here (noisy input, clean images, context) is in [-1, 1] (diffusers convention); the
  sampler converts its output to [0, 1].
* Feature normalisation: tokens are the predictor's outputs exactly as it returns them. The predictor is trained
  to match ``F.layer_norm(target_features, (D,))``, so they live in layer-normed target-feature space. The
  decoder applies no normalisation of its own; train it on the same kind of tokens it is fed at inference
  (predictor outputs, or layer-normed target features, which live in the same space).
* Patch indices are raster-order indices on the ``grid_size`` patch grid, as in ``ijepa.masks``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ijepa.masks import pooled

Conditioning = Literal["spatial_context", "pooled"]
CONDITIONINGS: tuple[str, ...] = ("spatial_context", "pooled")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
FEATURE_SPACE_NOTE = (
    "predictor outputs as returned: layer-normed target-encoder feature space (F.layer_norm over D, no affine); "
    "no extra normalisation inside the decoder"
)


def scatter_tokens(
    tokens: torch.Tensor,
    patch_indices: torch.Tensor,
    grid_size: tuple[int, int],
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Place tokens [B, K, D] at their raster patch indices [B, K] on a zero map [B, D, gh, gw].

    Padding tokens (``token_mask`` False) contribute nothing, whatever index they carry.
    """
    batch, _, dim = tokens.shape
    gh, gw = grid_size
    if token_mask is not None:
        tokens = tokens * token_mask.unsqueeze(-1).to(tokens.dtype)
        patch_indices = patch_indices.masked_fill(~token_mask, 0)
    grid = tokens.new_zeros(batch, gh * gw, dim)
    grid = grid.scatter_add(1, patch_indices.unsqueeze(-1).expand(-1, -1, dim), tokens)
    return grid.transpose(1, 2).reshape(batch, dim, gh, gw)


def largest_user_box(grid_size: Sequence[int]) -> tuple[int, int]:
    """The largest box (rows, cols of patches) decoder training draws, user-like or target-like: half the grid's side.
    Boxes beyond it are outside what a decoder has learnt; the app says so rather than present such sketches as its
    best."""
    return max(1, grid_size[0] // 2), max(1, grid_size[1] // 2)


def box_mask_from_indices(
    patch_indices: torch.Tensor,
    grid_size: tuple[int, int],
    image_size: tuple[int, int],
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel mask [B, 1, H, W] (1 inside the patches listed in ``patch_indices`` [B, K], else 0)."""
    gh, gw = grid_size
    height, width = image_size
    if height % gh or width % gw:
        raise ValueError(f"image size {image_size} must be a multiple of the patch grid {grid_size}")
    if patch_indices.numel() and (patch_indices.min() < 0 or patch_indices.max() >= gh * gw):
        raise ValueError(
            f"patch_indices must lie in [0, {gh * gw}) for a {gh}x{gw} grid, got range "
            f"[{int(patch_indices.min())}, {int(patch_indices.max())}]"
        )
    keep = torch.ones_like(patch_indices, dtype=torch.float32)
    if token_mask is not None:
        keep = keep * token_mask
    flat = torch.zeros(patch_indices.size(0), gh * gw, device=patch_indices.device)
    flat = flat.scatter_add(1, patch_indices, keep).clamp_(max=1.0)
    return F.interpolate(flat.view(-1, 1, gh, gw), size=(height, width), mode="nearest")


@dataclass
class SketchCondition:
    """What the decoder is conditioned on, for a batch of B (image, target box) pairs.

    Attributes:
        tokens: predicted features for the target box [B, K, D] (predictor outputs, as they come).
        patch_indices: raster patch indices of those tokens [B, K] (LongTensor).
        context: the image with the box blanked to 0, [B, 3, H, W] in [-1, 1]. The model reads it only in
            "spatial_context" mode, but the sampler always pastes it back outside the box.
        box_mask: 1 inside the box, 0 outside, [B, 1, H, W].
        token_mask: optional bool [B, K], False for padding, so boxes with different token counts can share
            a batch (see ``SketchCondition.cat``).
    """

    tokens: torch.Tensor
    patch_indices: torch.Tensor
    context: torch.Tensor
    box_mask: torch.Tensor
    token_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.dim() != 3:
            raise ValueError(f"tokens must be [B, K, D], got {tuple(self.tokens.shape)}")
        batch, num_tokens = self.tokens.shape[:2]
        if tuple(self.patch_indices.shape) != (batch, num_tokens):
            raise ValueError(
                f"patch_indices {tuple(self.patch_indices.shape)} must match tokens [B, K] = {(batch, num_tokens)}"
            )
        if self.token_mask is not None:
            if self.token_mask.dtype != torch.bool or tuple(self.token_mask.shape) != (batch, num_tokens):
                raise ValueError(f"token_mask must be a bool tensor of shape {(batch, num_tokens)}")
        if self.context.dim() != 4 or self.context.shape[:2] != (batch, 3):
            raise ValueError(f"context must be [B={batch}, 3, H, W], got {tuple(self.context.shape)}")
        if tuple(self.box_mask.shape) != (batch, 1, *self.context.shape[2:]):
            raise ValueError(
                f"box_mask {tuple(self.box_mask.shape)} must be [B, 1, H, W] matching context "
                f"{tuple(self.context.shape)}"
            )

    @classmethod
    def from_image(
        cls,
        image: torch.Tensor,
        tokens: torch.Tensor,
        patch_indices: torch.Tensor,
        grid_size: tuple[int, int],
        token_mask: torch.Tensor | None = None,
    ) -> "SketchCondition":
        """Build the condition from the full image [B or 1, 3, H, W] in [-1, 1] and the box's tokens/indices.

        The box is every patch in ``patch_indices`` (padding excluded); it is blanked to 0 in the context.
        A single image is shared by all B boxes.
        """
        if image.dim() != 4 or image.size(1) != 3:
            raise ValueError(f"image must be [B, 3, H, W] in [-1, 1], got {tuple(image.shape)}")
        batch = tokens.size(0)
        if image.size(0) == 1 and batch > 1:
            image = image.expand(batch, -1, -1, -1)
        elif image.size(0) != batch:
            raise ValueError(f"image batch {image.size(0)} must be 1 or match the tokens batch {batch}")
        patch_indices = patch_indices.to(image.device)
        box_mask = box_mask_from_indices(patch_indices, grid_size, tuple(image.shape[-2:]), token_mask)
        box_mask = box_mask.to(image.dtype)
        context = image.masked_fill(box_mask.bool(), 0.0)
        return cls(tokens, patch_indices, context, box_mask, token_mask)

    @classmethod
    def cat(cls, conditions: Sequence["SketchCondition"]) -> "SketchCondition":
        """Concatenate conditions along the batch, padding token counts to the largest K (token_mask marks padding)."""
        if not conditions:
            raise ValueError("cat needs at least one SketchCondition")
        max_tokens = max(c.tokens.size(1) for c in conditions)
        tokens, indices, masks = [], [], []
        for c in conditions:
            pad = max_tokens - c.tokens.size(1)
            mask = c.token_mask if c.token_mask is not None else torch.ones_like(c.patch_indices, dtype=torch.bool)
            tokens.append(F.pad(c.tokens, (0, 0, 0, pad)))
            indices.append(F.pad(c.patch_indices, (0, pad)))
            masks.append(F.pad(mask, (0, pad), value=False))
        needs_mask = any(c.token_mask is not None or c.tokens.size(1) < max_tokens for c in conditions)
        return cls(
            tokens=torch.cat(tokens),
            patch_indices=torch.cat(indices),
            context=torch.cat([c.context for c in conditions]),
            box_mask=torch.cat([c.box_mask for c in conditions]),
            token_mask=torch.cat(masks) if needs_mask else None,
        )

    @property
    def batch_size(self) -> int:
        return self.tokens.size(0)

    def repeat(self, num_samples: int) -> "SketchCondition":
        """Repeat each condition ``num_samples`` times, condition-major: [c0, c0, ..., c1, c1, ...]."""
        fields = (self.tokens, self.patch_indices, self.context, self.box_mask, self.token_mask)
        return SketchCondition(*(None if x is None else x.repeat_interleave(num_samples, dim=0) for x in fields))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SketchCondition":
        """Move to a device; ``dtype`` applies to the float tensors only."""
        return replace(
            self,
            tokens=self.tokens.to(device=device, dtype=dtype),
            patch_indices=self.patch_indices.to(device),
            context=self.context.to(device=device, dtype=dtype),
            box_mask=self.box_mask.to(device=device, dtype=dtype),
            token_mask=None if self.token_mask is None else self.token_mask.to(device),
        )

    def pooled_tokens(self) -> torch.Tensor:
        """Average-pool of the box tokens [B, D], ignoring padding."""
        return pooled(self.tokens, self.token_mask)


class DecoderWeightsMismatch(ValueError):
    """A decoder folder whose weights do not fit its config.json (the two files come from different decoders)."""


class SketchDecoder(ModelMixin, ConfigMixin):
    """Pixel-space UNet that denoises images given I-JEPA predictor outputs for a target box.

    Args:
        feature_dim: token width D (the encoder's embed_dim; vit_tiny = 192).
        grid_size: encoder patch grid (gh, gw); image_size must be a multiple of it.
        image_size: square image side in pixels.
        conditioning: "spatial_context" (pooled + per-patch feature map + visible context + box mask) or
            "pooled" (the I-JEPA paper's RCDM: pooled predictor output only, the UNet input is the noisy image).
        feature_channels: channels of the projected per-patch feature map (spatial_context only).
        block_out_channels, layers_per_block: UNet widths and depth per resolution level.
        attention_levels: per level, whether its blocks use self-attention (default: lowest resolution only).
        mid_block_attention: self-attention in the middle block (also at the lowest resolution).
        attention_head_dim, norm_num_groups: UNet attention head width and GroupNorm groups.
        num_train_timesteps, beta_schedule: the DDPM noise schedule, shared by training and the sampler.
            Linear betas over 1000 steps as in RCDM; unlike the cosine schedule (whose capped end reaches
            sigma/alpha ~ 2e4) its log-SNR range suits the sampler's uniform log-SNR steps (see pipeline).
        prediction_type: "sample" (default: the clean image x0), "v_prediction" or "epsilon". "sample" predicts
            x0 directly: its plain MSE weights the noisy timesteps most, where the layout and colours are decided,
            so a briefly trained decoder draws smooth regions instead of leftover noise (measured in
            bench/RESULTS.md, "Decoder: predicting x0 instead of v"). For few-step sampling v beats epsilon:
            DPM-Solver++ integrates the x0 prediction, and with v the x0 estimate ``alpha*x - sigma*v`` stays well
            conditioned at high noise, while epsilon's ``(x - sigma*eps)/alpha`` divides by alpha -> 0 (0.006 at
            t=999 with linear betas), where a 10-15 step sampler takes its first, largest steps (Salimans & Ho
            2022).
        outside_box_loss_weight: spatial_context only: per-pixel loss weight outside the box (inside is 1).
            The sampler pastes the exact context back outside the box, so those pixels only need to be
            good enough to keep the box seams coherent.
        feature_space: free-text record of what the tokens are expected to be (see module docstring).
        model_signature: ``IJepa.feature_signature()`` of the model whose tokens the decoder learnt (empty for
            decoders saved before it was recorded), so a decoder is not used with another model of the same shapes.
    """

    @register_to_config
    def __init__(
        self,
        feature_dim: int = 192,
        grid_size: tuple[int, int] = (16, 16),
        image_size: int = 64,
        conditioning: Conditioning = "spatial_context",
        feature_channels: int = 16,
        block_out_channels: tuple[int, ...] = (32, 64, 128),
        layers_per_block: int = 1,
        attention_levels: tuple[bool, ...] = (False, False, True),
        mid_block_attention: bool = True,
        attention_head_dim: int = 32,
        norm_num_groups: int = 32,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        prediction_type: str = "sample",
        outside_box_loss_weight: float = 0.1,
        feature_space: str = FEATURE_SPACE_NOTE,
        model_signature: tuple[float, ...] = (),
    ):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if len(attention_levels) != len(block_out_channels):
            raise ValueError(
                f"attention_levels {tuple(attention_levels)} needs one entry per block_out_channels "
                f"level {tuple(block_out_channels)}"
            )
        if any(channels % norm_num_groups for channels in block_out_channels):
            raise ValueError(f"every block_out_channels entry must be a multiple of norm_num_groups "
                             f"({norm_num_groups}, the UNet's GroupNorm), got {tuple(block_out_channels)}")
        gh, gw = grid_size
        if image_size % gh or image_size % gw:
            raise ValueError(f"image_size {image_size} must be a multiple of grid_size {tuple(grid_size)}")
        halvings = len(block_out_channels) - 1  # each level but the last halves the image, and the way up doubles it
        if image_size % 2**halvings:
            raise ValueError(f"image_size {image_size} must be a multiple of {2**halvings}: the UNet's "
                             f"{len(block_out_channels)} levels halve it {halvings} times, and the decoder draws at the "
                             "model's image size: use a model trained at such a size")
        self.spatial = conditioning == "spatial_context"
        time_embed_dim = 4 * block_out_channels[0]
        in_channels = 3 + (3 + 1 + feature_channels if self.spatial else 0)

        down_blocks = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
        up_blocks = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
        self.unet = UNet2DModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=3,
            down_block_types=down_blocks,
            up_block_types=up_blocks,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            add_attention=mid_block_attention,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            resnet_time_scale_shift="scale_shift",
            class_embed_type="identity",
        )
        # RCDM's representation path: pooled feature -> time-embedding width, added to the timestep embedding.
        self.pooled_embedding = nn.Sequential(
            nn.Linear(feature_dim, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        self.feature_proj = nn.Conv2d(feature_dim, feature_channels, kernel_size=1) if self.spatial else None
        self._train_scheduler: DDPMScheduler | None = None

    @classmethod
    def load_checked(cls, folder, **kwargs) -> "SketchDecoder":
        """``from_pretrained`` (safetensors only, nothing unpickled; ``low_cpu_mem_usage=False``: the same loading
        path with or without accelerate installed) that refuses weights which do not all fit the
        folder's config.json: diffusers only warns about missing or unexpected keys, and leaves a missing weight
        uninitialised, so a mismatched folder drew wrong sketches with no word. DecoderWeightsMismatch then."""
        try:
            decoder, info = cls.from_pretrained(folder, low_cpu_mem_usage=False, use_safetensors=True,
                                                output_loading_info=True, **kwargs)
        except RuntimeError as err:
            if "state_dict" not in str(err):  # not a weights/config mismatch: a real error, shown as it is
                raise
            detail = " ".join(str(err).split())[:300] + "..."  # torch's load_state_dict: shapes that do not fit
        else:
            kinds = ("missing_keys", "unexpected_keys", "mismatched_keys")
            wrong = [(kind, info[kind]) for kind in kinds if info[kind]]
            if not wrong:
                return decoder
            detail = "; ".join(f"{kind.replace('_', ' ')}: {', '.join(map(str, keys[:3]))}"
                               f"{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}" for kind, keys in wrong)
        raise DecoderWeightsMismatch(f"{folder}: its weights do not fit its config.json (the two files come from "
                                     f"different decoders?): {detail}")

    def feature_map(self, cond: SketchCondition) -> torch.Tensor:
        """Per-patch tokens -> [B, feature_channels, H, W]: scatter on the grid, 1x1 conv, nearest upsample."""
        if self.feature_proj is None:
            raise ValueError('feature_map is only used with conditioning="spatial_context"')
        grid = scatter_tokens(cond.tokens, cond.patch_indices, tuple(self.config.grid_size), cond.token_mask)
        size = self.config.image_size
        return F.interpolate(self.feature_proj(grid), size=(size, size), mode="nearest")

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor | int, cond: SketchCondition) -> torch.Tensor:
        """Predict epsilon, v or x0 (``config.prediction_type``) for noisy images [B, 3, H, W] at ``timesteps``."""
        if cond.batch_size != noisy.size(0):
            raise ValueError(
                f"cond has batch {cond.batch_size} but noisy has {noisy.size(0)}; use cond.repeat(n) for n samples"
            )
        if cond.tokens.size(-1) != self.config.feature_dim:
            raise ValueError(f"tokens have width {cond.tokens.size(-1)}, decoder expects {self.config.feature_dim}")
        size = self.config.image_size
        if tuple(noisy.shape[1:]) != (3, size, size):
            raise ValueError(f"noisy must be [B, 3, {size}, {size}], got {tuple(noisy.shape)}")
        cond = cond.to(noisy.device, noisy.dtype)
        class_labels = self.pooled_embedding(cond.pooled_tokens())
        if self.spatial:
            sample = torch.cat([noisy, cond.context, cond.box_mask, self.feature_map(cond)], dim=1)
        else:
            sample = noisy
        return self.unet(sample, timesteps, class_labels=class_labels).sample

    def make_train_scheduler(self) -> DDPMScheduler:
        """The DDPM forward process this decoder is trained with (same schedule the sampler solves)."""
        return DDPMScheduler(
            num_train_timesteps=self.config.num_train_timesteps,
            beta_schedule=self.config.beta_schedule,
            prediction_type=self.config.prediction_type,
        )

    def loss_weights(self, cond: SketchCondition) -> torch.Tensor:
        """Per-pixel loss weights [B, 1, H, W]: 1 in the box, ``outside_box_loss_weight`` outside (pooled: all 1)."""
        if not self.spatial:
            return torch.ones_like(cond.box_mask)
        outside = self.config.outside_box_loss_weight
        return cond.box_mask + outside * (1.0 - cond.box_mask)

    def training_loss(
        self,
        clean_images: torch.Tensor,
        cond: SketchCondition,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Denoising loss for clean images [B, 3, H, W] in [-1, 1]: uniform t, Gaussian noise, weighted MSE.

        The target is the noise (epsilon), ``DDPMScheduler.get_velocity`` (v) or the clean image (sample). In
        "spatial_context" mode the squared error is weighted by ``loss_weights`` and normalised by the total
        weight; "pooled" mode is plain MSE over the whole image, as in RCDM.
        """
        if self._train_scheduler is None:
            self._train_scheduler = self.make_train_scheduler()
        scheduler = self._train_scheduler
        device = clean_images.device
        rand_device = generator.device if generator is not None else device
        batch = clean_images.size(0)
        timesteps = torch.randint(
            0, self.config.num_train_timesteps, (batch,), generator=generator, device=rand_device
        ).to(device)
        noise = torch.randn(clean_images.shape, generator=generator, device=rand_device).to(device, clean_images.dtype)
        noisy = scheduler.add_noise(clean_images, noise, timesteps)
        if self.config.prediction_type == "epsilon":
            target = noise
        elif self.config.prediction_type == "sample":
            target = clean_images
        else:
            target = scheduler.get_velocity(clean_images, noise, timesteps)
        prediction = self(noisy, timesteps, cond)
        squared_error = (prediction.float() - target.float()).pow(2)
        weights = self.loss_weights(cond.to(device, torch.float32))
        return (squared_error * weights).sum() / (weights.sum() * squared_error.size(1))
