"""The shipped default bundle in assets/: it loads, its parts agree, it fits the size budget, and a box on an
example produces sketches."""
from pathlib import Path

import pytest

from helpers import assert_a_box_produces_sketches, assert_bundle_parts_agree
from ijepa.bundle import SHIPPED_SIZE_LIMIT, folder_bytes

ASSETS = Path(__file__).resolve().parents[1] / "assets"
pytestmark = pytest.mark.skipif(
    not (ASSETS / "model" / "config.json").is_file(),
    reason="no default model shipped in assets/ yet (python -m train.default --export assets)")


def test_bundle_fits_the_size_budget():
    total = folder_bytes(ASSETS)
    assert total <= SHIPPED_SIZE_LIMIT == 60 * 2**20, f"assets/ holds {total / 2**20:.1f} MB, the budget is 60 MB"
    for name in ("MODEL_CARD.md", "metrics.json", "samples.png"):
        assert (ASSETS / name).is_file(), name


def test_configs_of_all_parts_agree():
    cfg = assert_bundle_parts_agree(ASSETS)
    assert cfg.img_size >= 64 and cfg.trained_on


def test_a_box_on_an_example_produces_sketches():
    assert_a_box_produces_sketches(ASSETS)


def test_the_examples_show_what_the_card_says_they_show():
    """The card says the examples were kept where the app's readout names the hidden emoji's group (and subgroup):
    the app's own engine must read each one that way (a model swapped in without new examples would fail here)."""
    import json

    from ijepa import panels
    from ijepa.engine import Engine

    metrics = json.loads((ASSETS / "metrics.json").read_text())
    if "examples" not in metrics:
        pytest.skip("a bundle exported before examples were chosen by the predictor's readout")
    entries = json.loads((ASSETS / "examples" / "examples.json").read_text())
    engine = Engine.load(ASSETS)
    assert len(entries) == metrics["examples"]["shown"] == len(engine.examples)
    for entry, example in zip(entries, engine.examples):
        analysis = engine.analyze(example.image(), example.boxes)
        # no "a guess beyond its training" caveat on the gallery: every box within what the decoders learnt to fill
        text = panels.explanation(analysis, engine.conditioning_of(None))
        assert "beyond its training" not in text, entry["caption"]
        probe = analysis.reports[0].probe
        assert probe["group"][0][0] == entry["probe_reads"], entry["caption"]
        if "subgroup_probe_reads" in entry:  # bundles chosen by both probes
            assert probe["subgroup"][0][0] == entry["subgroup_probe_reads"], entry["caption"]
    read_right = sum(entry["probe_reads"] == entry["group"] for entry in entries)
    assert read_right == min(metrics["examples"]["read_right"], len(entries))
    assert f"Of the {metrics['examples']['scanned']} scenes looked at" in (ASSETS / "MODEL_CARD.md").read_text()
