"""`python -m train.sweep`: each variant trains with its own overrides, is scored, and a rerun skips it."""
import json
from pathlib import Path

import pytest
import yaml

from train import sweep

REPO = Path(__file__).resolve().parents[1]


def fake_protocol(calls):
    def evaluate(model, seed, device, sources):
        calls.append(sources)
        scores = {"knn_group": 1.0, "knn_subgroup": 2.0, "linear_group": 3.0, "linear_subgroup": 4.0}
        return {"features": {s: dict(scores) for s in sources},
                "object_patches_only": {s: {"knn_group": 5.0, "knn_subgroup": 6.0} for s in sources
                                        if s != "context_encoder"}}
    return evaluate


def smoke_sweep(tmp_path: Path, variants: str, *flags: str) -> list[str]:
    """The command line of a sweep of the smoke config over ``variants`` (YAML) into tmp_path/sweep."""
    (tmp_path / "variants.yaml").write_text(variants)
    return ["--config", str(REPO / "train/configs/emoji_smoke.yaml"), "--variants", str(tmp_path / "variants.yaml"),
            "--out-dir", str(tmp_path / "sweep"), *flags]


def test_variants_train_with_their_overrides_and_resume(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(sweep.evaluation, "evaluate_emoji_features", fake_protocol(calls))
    argv = smoke_sweep(tmp_path, "plain: {}\nsiblings: {same_base_prob: 0.5, backgrounds: [solid, linear]}\n",
                       "--steps", "2")
    rows = sweep.main(argv)
    assert [r["variant"] for r in rows] == ["plain", "siblings"]
    saved = yaml.safe_load((tmp_path / "sweep" / "siblings" / "config.yaml").read_text())
    assert saved["same_base_prob"] == 0.5 and saved["backgrounds"] == ["solid", "linear"] and saved["steps"] == 2
    assert yaml.safe_load((tmp_path / "sweep" / "plain" / "config.yaml").read_text())["same_base_prob"] == 0.0
    assert calls == [("raw_pixels", "random_init"), ("target_encoder", "context_encoder"),
                     ("target_encoder", "context_encoder")]
    assert "| siblings | 1.0 | 2.0 | 3.0 | 1.0 | 5.0 |" in capsys.readouterr().out

    sweep.main(argv)  # everything is in results.jsonl: nothing trains or scores again
    assert len(calls) == 3
    lines = (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["variant"] for line in lines] == ["baselines", "plain", "siblings"]

    # other settings are not answered with the old rows (a rerun with --steps 6 printed the 2-step figures)
    with pytest.raises(ValueError, match=r"already scores variant 'plain' with other settings \(steps: 2 -> 6\)"):
        sweep.main(argv[:-1] + ["6"])
    # a last line cut by a kill: that variant runs again, the others are kept
    results = tmp_path / "sweep" / "results.jsonl"
    results.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    sweep.main(argv)
    assert len(calls) == 4 and len(results.read_text().splitlines()) == 3


def test_a_sweep_killed_between_training_and_scoring_continues(tmp_path, monkeypatch):
    calls = []
    evaluate = fake_protocol(calls)

    def killed_while_scoring_the_variant(model, seed, device, sources):
        if sources != ("raw_pixels", "random_init"):
            raise KeyboardInterrupt
        return evaluate(model, seed, device, sources)

    argv = smoke_sweep(tmp_path, "plain: {}\n", "--steps", "2")
    monkeypatch.setattr(sweep.evaluation, "evaluate_emoji_features", killed_while_scoring_the_variant)
    with pytest.raises(KeyboardInterrupt):
        sweep.main(argv)
    assert list((tmp_path / "sweep" / "plain" / "checkpoints").glob("ckpt-*.pt"))  # trained, not scored

    # the training it did took 123.4 s, say (the smoke run's own time rounds to 0.0 on a fast machine)
    log = tmp_path / "sweep" / "plain" / "log.csv"
    *head, last = log.read_text().splitlines()
    log.write_text("\n".join([*head, last.rsplit(",", 1)[0] + ",123.4"]) + "\n")
    monkeypatch.setattr(sweep.evaluation, "evaluate_emoji_features", evaluate)
    rows = sweep.main(argv)  # resumes the variant from its checkpoint instead of refusing its folder
    assert [r["variant"] for r in rows] == ["plain"] and calls[-1] == ("target_encoder", "context_encoder")
    assert rows[0]["seconds"] == 123.4  # the run's, from its log: this call trained nothing (it said ~0 s)


def test_baselines_scored_for_another_base_model_are_not_reused(tmp_path, monkeypatch):
    """A later call with another base resolution or seed read its variants against the first call's raw pixels and
    random init, silently."""
    calls = []
    monkeypatch.setattr(sweep.evaluation, "evaluate_emoji_features", fake_protocol(calls))
    argv = smoke_sweep(tmp_path, "a: {}\nb: {}\n", "--steps", "1")
    sweep.main([*argv, "--only", "a"])
    for other, message in ((["--img-size", "48"], "img_size: 32 -> 48"), (["--seed", "3"], "seed: 0 -> 3")):
        with pytest.raises(ValueError, match=f"baselines scored for another base model or seed \\({message}"):
            sweep.main([*argv, "--only", "b", *other])
    assert not (tmp_path / "sweep" / "b").exists() and len(calls) == 2  # nothing trained or scored for b
    sweep.main([*argv, "--only", "b"])  # the same base: its baselines serve
    assert calls.count(("raw_pixels", "random_init")) == 1


def test_a_misspelt_override_is_refused_before_anything_trains(tmp_path):
    variants = tmp_path / "variants.yaml"
    variants.write_text("typo: {learning_rate: 0.1}\n")
    with pytest.raises(ValueError, match="'typo' sets unknown config keys \\['learning_rate'\\]"):
        sweep.load_variants(variants)
    # a name is a folder under --out-dir: '../x' trained outside it; 'baselines' is the baseline row's
    for name in ("../escaped", ".hidden", "baselines", "a/b"):
        variants.write_text(f"'{name}': {{}}\n")
        with pytest.raises(ValueError, match="variant name"):
            sweep.load_variants(variants)
    variants.write_text("plain: {steps: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        sweep.load_variants(variants)
    with pytest.raises(FileNotFoundError, match="--variants .*nope.yaml: no such file"):  # was a bare [Errno 2]
        sweep.load_variants(tmp_path / "nope.yaml")


def test_a_bad_value_in_a_variant_is_refused_before_the_baselines(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep.evaluation, "evaluate_emoji_features", lambda *a, **k: pytest.fail("scored"))
    variants = tmp_path / "variants.yaml"
    variants.write_text("plain: {}\nbad: {steps: abc}\n")
    with pytest.raises(ValueError, match="steps: expected a whole number"):
        sweep.main(["--config", str(REPO / "train/configs/emoji_smoke.yaml"), "--variants", str(variants),
                    "--out-dir", str(tmp_path / "sweep"), "--device", "auto"])
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("path", sorted((REPO / "train/configs").glob("sweep_*.yaml")), ids=lambda p: p.name)
def test_shipped_variant_files_name_only_real_settings(path):
    assert sweep.load_variants(path), f"{path.name} lists no variants"


def test_an_unknown_variant_in_only_is_refused_with_one_error_line(tmp_path, capsys):
    argv = smoke_sweep(tmp_path, "plain: {}\n", "--only", "plain,zzz")
    with pytest.raises(SystemExit) as stop:
        sweep.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "error: --only names variants" in err and "['zzz']" in err
    assert not (tmp_path / "sweep").exists()  # refused before anything is written
