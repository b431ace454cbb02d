"""The I-JEPA objective and its optimisation schedules, as pure functions shared by training and benchmarks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ijepa.inference import target_features
from ijepa.masks import apply_masks


class TargetFeatures(nn.Module):
    """The target encoder's whole pass as one module: ``target_features`` with the model's own target settings.

    Why a module: ``torch.compile`` of the bare encoder covers its ``forward`` only, while data2vec-style targets
    (``layers > 1``) read ``block_outputs``; compiling this covers every target setting. It holds no weights of its
    own and is not part of any checkpoint.
    """

    def __init__(self, target_encoder: nn.Module, norm: str = "layer", layers: int = 1):
        super().__init__()
        self.target_encoder, self.norm, self.layers = target_encoder, norm, layers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return target_features(self.target_encoder, images, self.norm, self.layers)


def ijepa_loss(encoder: nn.Module, predictor: nn.Module, target_pass: nn.Module, images: torch.Tensor,
               context_masks: list[torch.Tensor], target_masks: list[torch.Tensor]) -> torch.Tensor:
    """Smooth-L1 between the predictor's outputs and the normalised target-encoder features of the target blocks.

    ``target_pass`` (a ``TargetFeatures``) sees the FULL image; with the paper's settings its features are normalised
    per token (an affine-free LayerNorm) before gathering, exactly as in the paper's code. With one context mask
    per image (the official setup) predictions and gathered targets line up row for row; with several, the
    predictions come ordered (target, context, image) and each target is repeated for every context.
    """
    with torch.no_grad():
        targets = apply_masks(target_pass(images), target_masks)
        if len(context_masks) > 1:  # predictions are ordered (target, context, image)
            b = images.size(0)
            targets = targets.view(len(target_masks), 1, b, *targets.shape[1:])
            targets = targets.expand(-1, len(context_masks), -1, -1, -1).reshape(-1, *targets.shape[-2:])
    context = encoder(images, context_masks)
    predictions = predictor(context, context_masks, target_masks)
    return F.smooth_l1_loss(predictions.float(), targets.float())


@torch.no_grad()
def target_spread(target_pass: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """How different a batch's target tokens are: the standard deviation of each feature of ``target_pass`` (a
    ``TargetFeatures``, the loss's own target) over every token of every image, averaged over features (about 0.4
    for the shipped emoji model's layer-normed targets).

    Near 0 means collapse: the encoder gives every patch the same vector (with instance-normed targets, every
    patch of an image), and the loss falls to ~0 as if training were going well (measured on a 16 x 16 grid in
    bench/RESULTS.md, "Semantics").
    """
    return target_pass(images).float().flatten(0, 1).std(0).mean()


@torch.no_grad()
def ema_update(target_params: list[torch.Tensor], online_params: list[torch.Tensor], momentum: float) -> None:
    """target = momentum * target + (1 - momentum) * online, as one fused multi-tensor op."""
    torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)


def param_groups(modules: list[nn.Module]) -> list[dict]:
    """Two AdamW groups: weights decayed, biases and 1-D parameters (norms) not, as in the official code.

    Fixed (non-trainable) tables such as the sin-cos position embeddings are left out.
    """
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


def learning_rate(step: int, total_steps: int, warmup_steps: int, start_lr: float, peak_lr: float,
                  final_lr: float) -> float:
    """Linear warmup start_lr -> peak_lr, then cosine decay to final_lr at total_steps.

    Steps count from 0 here, as the EMA's do. The official schedulers advance before the first update, so their lr
    and weight decay run one step ahead of these: a difference of one warmup increment at most, kept so that the
    shipped model's command reproduces it.
    """
    if step < warmup_steps:
        return start_lr + (peak_lr - start_lr) * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def weight_decay(step: int, total_steps: int, start_wd: float, final_wd: float) -> float:
    """Cosine INCREASE from start_wd to final_wd (official: 0.04 -> 0.4)."""
    progress = min(1.0, step / max(1, total_steps))
    return final_wd + (start_wd - final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_momentum(step: int, total_steps: int, start: float, end: float) -> float:
    """Linear momentum schedule start -> end over the whole run (official: 0.996 -> 1.0, with its ipe_scale 1.0)."""
    return start + (end - start) * min(1.0, step / max(1, total_steps))


def set_optimizer_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd", True):
            group["weight_decay"] = wd
