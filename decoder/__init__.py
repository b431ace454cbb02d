"""RCDM-style diffusion decoder: turns I-JEPA predictor outputs for a box into pixel sketches."""
from .model import (
    CONDITIONINGS,
    FEATURE_SPACE_NOTE,
    DecoderWeightsMismatch,
    SketchCondition,
    SketchDecoder,
    box_mask_from_indices,
    largest_user_box,
    scatter_tokens,
)
from .pipeline import DEFAULT_NUM_STEPS, SketchProgress, SketchSampler, initial_noise, make_default_scheduler

__all__ = [
    "CONDITIONINGS",
    "DEFAULT_NUM_STEPS",
    "DecoderWeightsMismatch",
    "FEATURE_SPACE_NOTE",
    "SketchCondition",
    "SketchDecoder",
    "SketchProgress",
    "SketchSampler",
    "box_mask_from_indices",
    "initial_noise",
    "largest_user_box",
    "make_default_scheduler",
    "scatter_tokens",
]
