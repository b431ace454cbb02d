"""I-JEPA models, masks and checkpoints.

The names below load their module on first use (PEP 562), so ``import ijepa.errors`` imports no torch: the app's UI
(app.py) catches ``InputError`` without loading any model code. Nothing else happens at import.
"""
from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what editors and type checkers see: the same names, imported as usual
    from .checkpoint import CheckpointError, load_model, save_model
    from .masks import apply_masks
    from .model import IMAGENET_MEAN, IMAGENET_STD, IJepa, IJepaConfig
    from .predictor import VisionTransformerPredictor, vit_predictor
    from .vision_transformer import (VIT_ARCHS, VisionTransformer, vit_base, vit_giant, vit_huge, vit_large,
                                     vit_small, vit_tiny)

_MODULE_OF = {
    "CheckpointError": "checkpoint", "load_model": "checkpoint", "save_model": "checkpoint",
    "apply_masks": "masks",
    "IMAGENET_MEAN": "model", "IMAGENET_STD": "model", "IJepa": "model", "IJepaConfig": "model",
    "VisionTransformerPredictor": "predictor", "vit_predictor": "predictor",
    **{name: "vision_transformer" for name in ("VIT_ARCHS", "VisionTransformer", "vit_tiny", "vit_small", "vit_base",
                                               "vit_large", "vit_huge", "vit_giant")},
}

__all__ = [
    "CheckpointError", "load_model", "save_model", "apply_masks", "IMAGENET_MEAN", "IMAGENET_STD", "IJepa",
    "IJepaConfig", "VisionTransformerPredictor", "vit_predictor", "VIT_ARCHS", "VisionTransformer", "vit_tiny",
    "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant",
]


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
