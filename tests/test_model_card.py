"""The model card's headline verdicts (kNN margin, predictor-probe ratio, floors) and its tables come from the
run's own figures: the shipped card's metrics with chosen values swapped in, so every figure is known."""
import copy
import json
from pathlib import Path

import pytest

from train.model_card import write_model_card

METRICS = Path(__file__).resolve().parents[1] / "assets" / "metrics.json"


@pytest.fixture()
def summary() -> dict:
    summary = copy.deepcopy(json.loads(METRICS.read_text()))
    feats = summary["features"]["features"]
    feats["raw_pixels"].update(knn_group=30.0, knn_subgroup=20.0, linear_group=33.0, linear_subgroup=21.0)
    feats["random_init"].update(knn_group=40.0, knn_subgroup=12.0, linear_group=34.0, linear_subgroup=13.0)
    feats["target_encoder"].update(knn_group=52.0, knn_subgroup=26.0, linear_group=61.0, linear_subgroup=27.0)
    semantics = summary["features"]["predictor_semantics"]
    semantics["heldout_emoji_group"] = {"true_acc": 40.0, "predicted_acc": 20.0, "ratio": 0.5}
    semantics["new_scenes_group"] = {"true_acc": 45.0, "predicted_acc": 40.5, "ratio": 0.9}
    return summary


def card_of(summary: dict, tmp_path: Path) -> str:
    write_model_card(summary, tmp_path / "MODEL_CARD.md")
    return (tmp_path / "MODEL_CARD.md").read_text()


def test_the_margin_is_over_the_better_of_pixels_and_random_init_and_judged_against_the_floor(summary, tmp_path):
    card = card_of(summary, tmp_path)  # random init (40) beats pixels (30): the margin is 52 - 40
    assert "raw pixels and random init: **+12.0 points** (floor: +15)" in card
    assert "15 points above raw pixels and random init: **not met** (+12.0)" in card
    summary["features"]["features"]["target_encoder"]["knn_group"] = 56.0
    card = card_of(summary, tmp_path)
    assert "**+16.0 points**" in card and "random init: met (+16.0)" in card


def test_the_ratio_floor_reads_the_held_out_emoji_and_is_judged_against_0_6(summary, tmp_path):
    card = card_of(summary, tmp_path)
    assert "Held-out-emoji group ratio: **0.50** (floor: 0.6)" in card
    assert "(held-out emoji, group): **not met** (0.50)" in card
    assert "| heldout_emoji_group | 40.0 % | 20.0 % | 0.50 |" in card  # true, then predicted
    summary["features"]["predictor_semantics"]["heldout_emoji_group"]["ratio"] = 0.75
    assert "(held-out emoji, group): met (0.75)" in card_of(summary, tmp_path)


def test_the_feature_table_puts_each_figure_in_its_column(summary, tmp_path):
    card = card_of(summary, tmp_path)
    assert "| features | kNN group | kNN subgroup | linear group | linear subgroup |" in card
    assert "| target_encoder | 52.0 % | 26.0 % | 61.0 % | 27.0 % |" in card
    assert "| random_init | 40.0 % | 12.0 % | 34.0 % | 13.0 % |" in card


def test_what_to_measure_next_follows_the_profile_that_made_the_run(summary, tmp_path):
    """Below the floor the card quotes the project's other runs; its next step must not be the run it describes."""
    summary["profile"] = "cpu"
    assert "Next to measure: the GPU profile" in card_of(summary, tmp_path)
    summary["profile"] = "gpu"
    card = card_of(summary, tmp_path)
    assert "Next to measure: more seeds of this profile" in card and "Next to measure: the GPU profile" not in card
    assert "the shipped model)" not in card  # other runs are named as such, never as this one


def test_a_copy_without_git_names_its_commit_from_the_environment(monkeypatch):
    """The GPU machine gets the working tree without .git: bench/device_run.sh passes the commit along."""
    import subprocess

    from train import runtime
    assert runtime.code_version() not in ("", "unknown")  # a checkout: git says
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 128, "", "not a git repo"))
    monkeypatch.delenv(runtime.CODE_VERSION_ENV, raising=False)
    assert runtime.code_version() == "unknown"
    monkeypatch.setenv(runtime.CODE_VERSION_ENV, "1fd158a with local changes")
    assert runtime.code_version() == "1fd158a with local changes"


def test_a_decoder_trained_again_is_called_longer_only_when_it_was(summary, tmp_path):
    """replace_decoder's card said "longer" for a decoder trained again on as many images as the recipe's."""
    card = card_of(summary, tmp_path)  # the shipped bundle: both trained on 96,000 images, the recipe's on 9,984
    assert "Then ours was trained again on this bundle's frozen model, longer: 96,000 images" in card
    summary["paper_decoder_config"].update(steps=summary["recipe_decoder_config"]["steps"],
                                           batch_size=summary["recipe_decoder_config"]["batch_size"])
    card = card_of(summary, tmp_path)
    assert "Then the paper-faithful decoder was trained again on this bundle's frozen model, as long: 9,984" in card
