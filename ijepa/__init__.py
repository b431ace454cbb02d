"""I-JEPA models, masks and checkpoints (no side effects at import)."""
from .checkpoint import CheckpointError, load_model, save_model
from .masks import apply_masks
from .model import IMAGENET_MEAN, IMAGENET_STD, IJepa, IJepaConfig
from .predictor import VisionTransformerPredictor, vit_predictor
from .vision_transformer import (VIT_ARCHS, VisionTransformer, vit_base, vit_giant, vit_huge, vit_large, vit_small,
                                 vit_tiny)

__all__ = [
    "CheckpointError", "load_model", "save_model", "apply_masks", "IMAGENET_MEAN", "IMAGENET_STD", "IJepa",
    "IJepaConfig", "VisionTransformerPredictor", "vit_predictor", "VIT_ARCHS", "VisionTransformer", "vit_tiny",
    "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant",
]
