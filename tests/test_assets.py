"""The shipped default bundle in assets/: it loads, its parts agree, it fits the size budget, and a box on an
example produces sketches."""
from pathlib import Path

import pytest

from helpers import assert_a_box_produces_sketches, assert_bundle_parts_agree
from ijepa.bundle import SHIPPED_SIZE_LIMIT, folder_bytes

ASSETS = Path(__file__).resolve().parents[1] / "assets"
pytestmark = pytest.mark.skipif(not (ASSETS / "model" / "config.json").is_file(),
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
