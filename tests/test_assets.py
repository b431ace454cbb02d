"""The shipped default bundle in assets/: it loads, its parts agree, it fits the size budget, and a box on an
example produces sketches."""
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from decoder import SketchDecoder
from ijepa.checkpoint import load_model
from ijepa.engine import Engine

ASSETS = Path(__file__).resolve().parents[1] / "assets"
pytestmark = pytest.mark.skipif(not (ASSETS / "model" / "config.json").is_file(),
                                reason="no default model shipped in assets/ yet (python -m train.default --export assets)")


def test_bundle_fits_the_size_budget():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total <= 60 * 2**20, f"assets/ holds {total / 2**20:.1f} MB, the budget is 60 MB"
    for name in ("MODEL_CARD.md", "metrics.json", "samples.png"):
        assert (ASSETS / name).is_file(), name


def test_configs_of_all_parts_agree():
    model = load_model(ASSETS / "model")
    cfg = model.config
    assert cfg.img_size >= 64 and model.predictor is not None and cfg.trained_on
    for name, conditioning in (("decoder", "spatial_context"), ("decoder_paper", "pooled")):
        decoder = SketchDecoder.from_pretrained(ASSETS / name)
        assert decoder.config.conditioning == conditioning
        assert decoder.config.feature_dim == cfg.embed_dim
        assert tuple(decoder.config.grid_size) == cfg.grid_size and decoder.config.image_size == cfg.img_size
    for level in ("group", "subgroup"):
        probe = load_file(ASSETS / f"probe_{level}.safetensors")
        labels = json.loads((ASSETS / f"probe_{level}.json").read_text())["labels"]
        assert probe["linear.weight"].shape == (len(labels), cfg.embed_dim)
    bank = load_file(ASSETS / "bank.safetensors")
    assert bank["features"].shape[1] == cfg.embed_dim
    assert len(bank["thumbnails"]) == len(bank["features"]) == len(bank["subgroup"])
    metrics = json.loads((ASSETS / "metrics.json").read_text())
    assert metrics["pretrain_config"]["img_size"] == cfg.img_size


def test_a_box_on_an_example_produces_sketches():
    engine = Engine.load(ASSETS, device="cpu")
    assert engine.has_decoder and engine.examples and engine.probes and engine.bank is not None
    example = engine.examples[0]
    analysis = engine.analyze(example.image(), list(example.boxes))
    updates = list(engine.stream_sketches(analysis, num_samples=2, seed=0))
    final = updates[-1]
    assert final.done and len(final.images) == 2  # each image: every box filled with one sample
    for sketch in final.images:
        assert sketch.dtype == np.uint8 and sketch.shape[-1] == 3 and sketch.std() > 0
    report = analysis.metrics()["boxes"][0]
    assert np.isfinite(report["prediction_error"])
