"""The one-command default recipe, end to end on its seconds-long smoke profile: every stage runs, the exported
bundle passes the same checks as the shipped one, the model card quotes the run's own figures, and a second
call skips the finished stages."""
import json
import shlex
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_a_box_produces_sketches, assert_bundle_parts_agree
from ijepa.bundle import BANK_NAME, DECODER_DIRS, MODEL_DIR, SHIPPED_SIZE_LIMIT, folder_bytes
from train import budget
from train import decoder as decoder_training
from train import default as recipe
from train.config import config_dict
from train.model_card import write_model_card
from train.runtime import code_version
from train import examples
from train import replace_decoder as replacing

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    try:
        from train.emoji import get_catalog
        get_catalog()
    except FileNotFoundError as error:
        pytest.skip(f"emoji files missing: {error}")
    root = tmp_path_factory.mktemp("recipe")
    refit, real_refit = [], budget.refit_decoders

    def refit_to_one_step(out, plan, spent_s, full_steps, num_decoders):
        # The smoke decoders' 2 steps are below the refit's floor, so the refit would keep them whatever the time
        # left: a profile of 1 step shows that what it returns is what the decoders train.
        refit.append(spent_s)
        return real_refit(out, plan, spent_s, 1, num_decoders)

    # a budget this run fits: the machine is timed (train/budget.py) and the smoke lengths are kept
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(budget, "refit_decoders", refit_to_one_step)
        recipe.main(["--out-dir", str(root / "run"), "--profile", "smoke", "--budget-minutes", "600",
                     "--export", str(root / "bundle")])
    (root / "refit.json").write_text(json.dumps(refit))
    return root


@pytest.fixture
def run(smoke_run, tmp_path):
    """The finished run copied to another folder, for the tests that call the recipe on it again: no test sees
    another's edits, and a moved run folder must go on where it stopped."""
    return shutil.copytree(smoke_run / "run", tmp_path / "run")


def no_refit(*args, **kwargs):
    raise AssertionError("decoders that have started keep their length")


def test_every_stage_ran_and_the_bundle_works(smoke_run):
    summary = json.loads((smoke_run / "run" / "summary.json").read_text())
    assert set(summary["stage_seconds"]) == {"pretrain", "eval", "bank", "decoders", "decoder_eval"}
    assert summary["pretrain_config"]["steps"] == 3
    assert_bundle_parts_agree(smoke_run / "bundle")
    assert_a_box_produces_sketches(smoke_run / "bundle")


def test_the_emoji_protocol_reports_every_baseline(smoke_run):
    from train.emoji import get_catalog

    catalog = get_catalog()
    results = json.loads((smoke_run / "run" / "eval" / "results.json").read_text())
    assert results["bank_size"] == 2 * len(catalog.split_ids("train"))
    assert results["query_size"] == 2 * len(catalog.split_ids("heldout"))
    assert results["catalog"] == catalog.fingerprint and results["catalog_matches_training"] is True
    assert set(results["features"]) == {"raw_pixels", "random_init", "target_encoder", "context_encoder"}
    for scores in results["features"].values():
        assert set(scores) == {"knn_group", "linear_group", "knn_subgroup", "linear_subgroup"}
        assert all(0.0 <= v <= 100.0 for v in scores.values())
    # Chance on 9 groups is ~11 %; raw pixels of centred emoji are far above it.
    assert results["features"]["raw_pixels"]["knn_group"] > 20.0
    assert set(results["object_patches_only"]) == {"raw_pixels", "random_init", "target_encoder"}
    assert set(results["predictor_semantics"]) == {f"{s}_{l}" for s in ("new_scenes", "heldout_emoji")
                                                   for l in ("group", "subgroup")}


def test_the_examples_record_what_the_readout_says_of_them(smoke_run):
    bundle = smoke_run / "bundle"
    chosen = json.loads((bundle / "metrics.json").read_text())["examples"]
    entries = json.loads((bundle / "examples" / "examples.json").read_text())
    assert len(entries) == chosen["shown"] == 6 and chosen["scanned"] >= chosen["shown"]
    group_right = [entry["probe_reads"] == entry["group"] for entry in entries]
    both_right = [g and entry["subgroup_probe_reads"] == entry["subgroup"] for g, entry in zip(group_right, entries)]
    # misses only when too few were read right; among those read right, one per group before any group repeats,
    # read right by both probes before by the group probe alone
    rank = [g + b for g, b in zip(group_right, both_right)]
    assert rank[:sum(group_right)] == [r for r in rank if r]
    groups = [entry["group"] for entry, right in zip(entries, group_right) if right]
    varied = len(set(groups))
    assert len(set(groups[:varied])) == varied and rank[:varied] == sorted(rank[:varied], reverse=True)
    assert sum(group_right) == min(chosen["read_right"], 6)
    assert sum(both_right) <= chosen["read_right_subgroup_too"]
    assert chosen["read_right_subgroup_too"] <= chosen["read_right"] <= chosen["scanned"]
    assert (f"Of the {chosen['scanned']} scenes looked at, the group probe did in {chosen['read_right']} "
            in (bundle / "MODEL_CARD.md").read_text())


def test_the_gallery_shows_one_example_per_group_before_repeats():
    """Flags read right far more often than other groups: without this the gallery was five flags and a face."""
    from train.examples import one_per_group_first

    def pairs(*groups):
        return [(None, {"group": g, "n": k}) for k, g in enumerate(groups)]

    right = pairs("Flags", "Flags", "Flags", "Smileys", "Flags", "Food")
    missed = pairs("Objects")
    shown = [(e["group"], e["n"]) for _, e in one_per_group_first(right, missed, 5)]
    assert shown == [("Flags", 0), ("Smileys", 3), ("Food", 5), ("Flags", 1), ("Flags", 2)]
    shown = [e["group"] for _, e in one_per_group_first(right[:2], missed, 4)]
    assert shown == ["Flags", "Flags", "Objects"]  # misses last, and only as many as there are


def test_model_card_quotes_the_measured_figures(smoke_run):
    card = (smoke_run / "bundle" / "MODEL_CARD.md").read_text()
    metrics = json.loads((smoke_run / "bundle" / "metrics.json").read_text())
    pixels = metrics["features"]["features"]["raw_pixels"]["knn_group"]
    assert f"| raw_pixels | {pixels:.1f} %" in card
    assert "--profile smoke" in card and "24 images seen" in card
    assert metrics["code"] == code_version() and f"- Code: this project at commit {metrics['code']}." in card
    # the kNN pretraining logged as it went ends at what the evaluation stage measured for the exported model
    [last] = metrics["knn_during_pretraining"]
    assert last["images_seen"] == 24
    assert abs(last["knn_group"] - metrics["features"]["features"]["target_encoder"]["knn_group"]) <= 0.35
    assert f"kNN group by images seen: 24: {last['knn_group']:.1f} %." in card
    assert "object_patches_only" not in card and "Diagnostic (not the protocol)" in card
    # a smoke model is far below the kNN floor: the card says whether the points are missing on the object
    objects = metrics["features"]["object_patches_only"]["target_encoder"]["knn_group"]
    assert f"pooled over the emoji's own patches the encoder gives {objects:.1f} %" in card
    for name in metrics["decoders"]["decoders"]:
        assert f"| {name} |" in card
    assert "Themed scenes" not in card
    # A world whose scenes were composed by label says so on its card.
    metrics["pretrain_config"].update(theme_prob=0.5, theme="group")
    write_model_card(metrics, smoke_run / "themed.md", "python -m train.default --pretrain.theme-prob 0.5")
    assert "shares the main emoji's Unicode group with probability 0.5" in (smoke_run / "themed.md").read_text()
    # So does a model trained to predict data2vec's targets instead of the paper's.
    assert "data2vec" not in card
    metrics["pretrain_config"].update(target_norm="instance", target_layers=3)
    write_model_card(metrics, smoke_run / "d2v.md", "python -m train.default --target-norm instance")
    assert "Targets: data2vec's, not the paper's. Each feature of the target encoder's last 3 blocks" in (
        smoke_run / "d2v.md").read_text()


def test_the_sizes_planned_before_training_are_the_bundles(smoke_run):
    """The check that refuses an oversized --export at the start reads sizes off the settings: they must be the
    files' own (weights in fp16, the bank's thumbnails and features), or it refuses good bundles or passes bad ones."""
    flags = recipe.route_flags([])
    planned = recipe.planned_bundle_sizes(recipe.PROFILES["smoke"], smoke_run / "run", flags)
    bundle = smoke_run / "run" / recipe.BUNDLE_DIR
    for name in (MODEL_DIR, *DECODER_DIRS.values()):
        weights = sum(f.stat().st_size for f in (bundle / name).glob("*.safetensors"))
        assert planned[name] <= weights <= planned[name] + 64 * 1024, name  # + the safetensors header
    bank = (bundle / f"{BANK_NAME}.safetensors").stat().st_size
    assert planned[BANK_NAME] <= bank <= planned[BANK_NAME] + 1024
    rest = sum(folder_bytes(p) for p in bundle.iterdir() if p.name not in planned)
    assert rest <= recipe.OTHER_FILES_ESTIMATE
    assert folder_bytes(bundle) == folder_bytes(smoke_run / "bundle")  # --export copied the run's bundle
    assert {p.name for p in bundle.iterdir()} == recipe.BUNDLE_NAMES  # what an --export target is checked against


@pytest.mark.parametrize("profile", sorted(recipe.PROFILES))
def test_every_profile_makes_a_bundle_that_may_ship(tmp_path, profile):
    planned = recipe.planned_bundle_sizes(recipe.PROFILES[profile], tmp_path, recipe.route_flags([]))
    assert sum(planned.values()) <= SHIPPED_SIZE_LIMIT, planned
    assert not any(tmp_path.iterdir())


def test_the_size_limit_is_on_the_bundles_total_not_its_largest_part():
    """Two parts under 60 MB each can still make a bundle over it: the sum is what ships."""
    recipe.check_bundle_size({"model": 20 * 2**20, "decoder": 20 * 2**20}, "the bundle")
    with pytest.raises(ValueError, match="over the 60 MB"):
        recipe.check_bundle_size({"model": 40 * 2**20, "decoder": 30 * 2**20}, "the bundle")


def test_an_oversized_export_is_refused_before_any_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "SHIPPED_SIZE_LIMIT", 2**20)
    message = r"over the 1 MB the shipped assets may hold \(model .* MB, decoder .* MB.*block-out-channels"
    with pytest.raises(ValueError, match=message):
        recipe.main(["--out-dir", str(tmp_path / "run"), "--profile", "cpu", "--export", str(tmp_path / "assets")])
    assert not any(tmp_path.iterdir())


def test_an_export_target_that_holds_other_files_is_refused_before_any_stage(tmp_path):
    """Not after the recipe's 90 minutes, as it once was."""
    desktop = tmp_path / "desktop"
    desktop.mkdir()
    (desktop / "notes.txt").write_text("mine")
    (desktop / "metrics.json").write_text("{}")  # a bundle's own names are fine
    with pytest.raises(ValueError, match="desktop holds notes.txt, which the bundle does not"):
        recipe.main(["--out-dir", str(tmp_path / "run"), "--profile", "smoke", "--export", str(desktop)])
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="notes.txt is a file"):
        recipe.main(["--out-dir", str(tmp_path / "run"), "--profile", "smoke", "--export", str(desktop / "notes.txt")])
    assert not (tmp_path / "run").exists() and (desktop / "notes.txt").read_text() == "mine"


def test_export_replaces_a_whole_bundle_or_nothing(smoke_run, tmp_path, monkeypatch):
    bundle = smoke_run / "run" / recipe.BUNDLE_DIR
    earlier = tmp_path / "earlier"
    shutil.copytree(bundle, earlier)
    (earlier / "metrics.json").write_text("{}")
    shutil.rmtree(earlier / "examples")
    for backup in ("earlier.old", "earlier.new"):  # a user's own siblings, named as the swap once named its own
        (tmp_path / backup).mkdir()
        (tmp_path / backup / "keep.txt").write_text("mine")
    recipe.export_bundle(bundle, earlier)
    assert replacing.folder_digest(earlier) == replacing.folder_digest(bundle)
    # nothing staged or set aside is left, and the siblings are untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "earlier.new", "earlier.old"]
    assert all((tmp_path / backup / "keep.txt").read_text() == "mine" for backup in ("earlier.old", "earlier.new"))
    with pytest.raises(OSError):  # a copy that fails part-way leaves the bundle as it was, and no swap folder
        recipe.save_folder_atomic(lambda staged: (shutil.copytree(bundle, staged), open(staged / "x", "rb")), earlier)
    assert replacing.folder_digest(earlier) == replacing.folder_digest(bundle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "earlier.new", "earlier.old"]
    for backup in ("earlier.old", "earlier.new"):
        shutil.rmtree(tmp_path / backup)

    desktop = tmp_path / "desktop"
    desktop.mkdir()
    (desktop / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="desktop holds notes.txt, which the bundle does not"):
        recipe.export_bundle(bundle, desktop)
    assert [p.name for p in desktop.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="notes.txt is a file"):
        recipe.export_bundle(bundle, desktop / "notes.txt")
    assert (desktop / "notes.txt").read_text() == "mine"

    monkeypatch.setattr(recipe, "SHIPPED_SIZE_LIMIT", folder_bytes(bundle) - 1)
    (earlier / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="the shipped assets may hold"):
        recipe.export_bundle(bundle, earlier)
    assert (earlier / "metrics.json").read_text() == "{}"


def test_export_replaces_a_bundle_a_killed_decoder_swap_left_a_folder_in(smoke_run, tmp_path):
    """A kill during train.replace_decoder's swap leaves decoder.swap-XXXXXX in the bundle; --export then refused
    the bundle as holding a foreign file (review). It is the bundle's own leftover, replaced with the rest."""
    target = shutil.copytree(smoke_run / "bundle", tmp_path / "export")
    shutil.copytree(target / "decoder", target / "decoder.swap-k1ll3d" / "decoder")
    recipe.export_bundle(smoke_run / "run" / recipe.BUNDLE_DIR, target)
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in (smoke_run / "bundle").iterdir())
    with pytest.raises(ValueError, match="holds notes.swap-1, which the bundle does not"):  # only a part's leftover
        (target / "notes.swap-1").write_text("mine")
        recipe.export_bundle(smoke_run / "run" / recipe.BUNDLE_DIR, target)


def train_smoke_decoder(checkpoint, out_dir, steps, conditioning="spatial_context"):
    decoder_training.main(["--checkpoint", str(checkpoint), "--out-dir", str(out_dir), "--steps", str(steps),
                           "--batch-size", "4", "--block-out-channels", "32,32,32", "--warmup-steps", "1",
                           "--conditioning", conditioning])


def test_a_decoder_replacement_stopped_at_its_last_write_leaves_the_bundle_as_it_was(smoke_run, tmp_path, monkeypatch):
    """The decoder used to be swapped in, and samples.png copied, before metrics.json and the card were written: a
    kill in between left a new decoder under the old figures (review). The bundle is now swapped whole."""
    bundle = shutil.copytree(smoke_run / "bundle", tmp_path / "bundle")
    before = {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    train_smoke_decoder(bundle / "model", tmp_path / "long", 3)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(replacing, "write_model_card", killed)
    with pytest.raises(KeyboardInterrupt):
        replacing.main(["--bundle", str(bundle), "--run", str(tmp_path / "long")])
    assert {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "long"]  # no swap folder left beside it


def test_a_wrong_run_or_bundle_folder_is_named_with_the_one_to_pass(tmp_path):
    """--run given the decoder folder (or a typo) was told to finish its training; --bundle given the recipe's
    out-dir was told it is no bundle of train.default."""
    run = tmp_path / "decoder_long"
    (run / "decoder").mkdir(parents=True)
    (run / "decoder" / "config.json").write_text("{}")
    (run / "config.yaml").write_text("conditioning: spatial_context\n")
    with pytest.raises(FileNotFoundError, match=rf"is the decoder itself: pass its run folder, --run {run}$"):
        replacing.check_run(tmp_path / "bundle", run / "decoder")
    with pytest.raises(FileNotFoundError, match="--run .*nothere: no such folder"):
        replacing.check_run(tmp_path / "bundle", tmp_path / "nothere")
    out = tmp_path / "default_run"
    (out / "bundle" / "model").mkdir(parents=True)
    (out / "bundle" / "model" / "model.safetensors").write_bytes(b"")
    for command in (replacing.main, examples.main):
        with pytest.raises(FileNotFoundError, match=rf"out-dir of python -m train.default: its bundle is {out}/bundle"):
            command(["--bundle", str(out), *(["--run", str(run)] if command is replacing.main else [])])


def test_longer_decoders_replace_the_recipes_and_the_card_keeps_the_equal_length_comparison(smoke_run, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(smoke_run / "bundle", bundle)
    before = replacing.folder_digest(bundle)
    # A decoder of another model's weights (the run's fp32 model, not the bundle's fp16 copy) is refused untouched.
    train_smoke_decoder(smoke_run / "run" / "pretrain" / "model", tmp_path / "other", 1)
    with pytest.raises(ValueError, match="not on the weights"):
        replacing.main(["--bundle", str(bundle), "--run", str(tmp_path / "other")])
    assert replacing.folder_digest(bundle) == before

    recipe_metrics = json.loads((bundle / "metrics.json").read_text())
    train_smoke_decoder(bundle / "model", tmp_path / "long", 3)
    replacing.main(["--bundle", str(bundle), "--run", str(tmp_path / "long")])
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert metrics["decoder_config"]["steps"] == 3 and metrics["recipe_decoder_config"]["steps"] == 1
    assert metrics["recipe_decoders"] == recipe_metrics["decoders"]
    assert metrics["decoders"] == json.loads((tmp_path / "long" / "eval" / "results.json").read_text())
    assert metrics["decoders"]["num_images"] == recipe_metrics["decoders"]["num_images"]  # the same gallery, chance
    assert (bundle / "samples.png").read_bytes() == (tmp_path / "long" / "eval" / "samples.png").read_bytes()
    assert metrics["decoders"]["decoders"]["ours (spatial + context)"]["path"].endswith("decoder_fp16")  # as shipped
    shipped = load_file(bundle / "decoder" / "diffusion_pytorch_model.safetensors")
    trained = load_file(tmp_path / "long" / "decoder" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(shipped[k], trained[k].half()) for k in trained)
    card = (bundle / "MODEL_CARD.md").read_text()
    assert f"--out-dir {tmp_path / 'long'} --block-out-channels 32,32,32 --batch-size 4 --steps 3" in card
    assert f"python -m train.replace_decoder --bundle {bundle} --run {tmp_path / 'long'}" in card
    assert "At the recipe's length, both decoders trained on 4 images (1 steps x batch 4)" in card
    assert recipe_metrics["command"] in card  # the recipe's own command still heads the card
    assert "The paper-faithful decoder is the recipe's" in card
    assert "points,\n  the recipe's pair, below the table)." in card  # the table's two decoders differ in length
    assert_bundle_parts_agree(bundle)
    assert_a_box_produces_sketches(bundle)

    # The paper-faithful decoder trained as long, so the app compares the two at equal length: it takes the other
    # slot, ours stays, and the recipe's equal-length figures are still the ones the card keeps.
    ours_before = replacing.folder_digest(bundle / "decoder")
    train_smoke_decoder(bundle / "model", tmp_path / "long_paper", 3, conditioning="pooled")
    replacing.main(["--bundle", str(bundle), "--run", str(tmp_path / "long_paper")])
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert metrics["paper_decoder_config"]["conditioning"] == "pooled" and metrics["decoder_config"]["steps"] == 3
    assert metrics["recipe_decoders"] == recipe_metrics["decoders"]
    scored = metrics["decoders"]["decoders"]
    assert scored["paper (pooled only)"]["path"].endswith("decoder_fp16")
    assert scored["ours (spatial + context)"]["path"] == str(bundle / "decoder")
    assert replacing.folder_digest(bundle / "decoder") == ours_before
    shipped = load_file(bundle / "decoder_paper" / "diffusion_pytorch_model.safetensors")
    trained = load_file(tmp_path / "long_paper" / "decoder" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(shipped[k], trained[k].half()) for k in trained)
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "Then ours was trained again" in card and "Then the paper-faithful decoder was trained again" in card
    assert "recipe's; the table below" not in card
    assert "At the recipe's length, both decoders trained on 4 images (1 steps x batch 4)" in card
    assert "points,\n  the table's decoders)." in card  # both trained as long again: the floor judges those shipped
    assert_bundle_parts_agree(bundle)


def test_the_machine_is_timed_once_and_the_plan_kept_for_later_calls(smoke_run, run, monkeypatch):
    plan = json.loads((run / budget.PLAN_NAME).read_text())
    assert plan["pretrain_step_s"] > 0 and plan["decoder_step_s"] > 0 and plan["fraction"] == 1.0
    assert not (run / "timing").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["plan"] == plan
    assert summary["total_seconds"] >= sum(summary["stage_seconds"].values()) + plan["timing_s"] - 0.1
    # refitted once, before the decoders, from the seconds the stages before them took
    spent = sum(summary["stage_seconds"][stage] for stage in ("pretrain", "eval", "bank"))
    assert json.loads((smoke_run / "refit.json").read_text()) == [pytest.approx(spent)]
    assert plan["spent_before_decoders_s"] == pytest.approx(spent, abs=0.1)
    assert (plan["planned_decoder_steps"], plan["decoder_steps"], summary["decoder_config"]["steps"]) == (2, 1, 1)
    card = (smoke_run / "bundle" / "MODEL_CARD.md").read_text()
    assert "Budget: 600 minutes" in card and "took 1 steps each (planned 2)" in card

    def no_timing(*args, **kwargs):
        raise AssertionError("a planned run must not time the machine again")

    monkeypatch.setattr(budget, "time_steps", no_timing)
    monkeypatch.setattr(budget, "refit_decoders", no_refit)
    recipe.main(["--out-dir", str(run), "--profile", "smoke"])  # keeps the plan
    assert json.loads((run / "summary.json").read_text())["plan"] == plan
    with pytest.raises(ValueError, match="planned for a 600-minute budget, not 45"):
        recipe.main(["--out-dir", str(run), "--profile", "smoke", "--budget-minutes", "45"])


def test_a_second_call_skips_finished_stages_and_keeps_their_times(run, monkeypatch):
    first = json.loads((run / "summary.json").read_text())
    outputs = [run / "pretrain" / "model" / "config.json", run / "bank.safetensors", run / "eval" / "results.json"]
    before = [p.stat().st_mtime_ns for p in outputs]
    (run / "decoder_eval" / "results.json").unlink()  # this stage alone runs again
    machines = json.loads((run / recipe.STAGE_MACHINES).read_text())
    assert set(machines) == set(recipe.STAGE_OUTPUTS) and len(set(machines.values())) == 1
    (run / recipe.STAGE_MACHINES).write_text(json.dumps({**machines, "pretrain": "an H100 elsewhere"}))
    monkeypatch.setattr(recipe, "code_version", lambda: "c0ffee1")  # the code changed between the calls
    recipe.main(["--out-dir", str(run), "--profile", "smoke"])
    assert [p.stat().st_mtime_ns for p in outputs] == before
    summary = json.loads((run / "summary.json").read_text())
    for stage in ("pretrain", "eval", "bank", "decoders"):
        assert summary["stage_seconds"][stage] == first["stage_seconds"][stage]  # the time it took when it ran
    assert (run / "decoder_eval" / "results.json").is_file()
    # the card names each stage's machine, and the command that started the run before this call's
    assert summary["hardware"].startswith("pretrain: an H100 elsewhere; eval: ")
    assert summary["command"] == f"{first['command']} (then: python -m train.default --out-dir {run} --profile smoke)"
    assert summary["code"] == f"{first['code']} (then: c0ffee1)"  # the commit the run started on, then this call's


def test_damaged_outputs_of_finished_stages_are_made_again_and_never_exported(smoke_run, run, tmp_path, monkeypatch):
    """A file of a finished stage damaged since (a disk that filled up, a copy cut short) is found before any stage
    runs: what is computed is computed again, a training stage's export is written again from its run's last
    checkpoint, and the bundle --export swaps in is whole. Nothing is trained again."""
    original = smoke_run / "run"
    export = shutil.copytree(smoke_run / "bundle", tmp_path / "export")
    decoder_weights = "decoder_spatial_context/decoder/diffusion_pytorch_model.safetensors"
    for name in ("bank.safetensors", "eval/probe_group.safetensors", "decoder_eval/samples.png",
                 "pretrain/model/model.safetensors", "pretrain/config.yaml", decoder_weights):
        with open(run / name, "r+b") as f:
            f.truncate(min(5000, (run / name).stat().st_size // 2))
    checkpoints = sorted((run / "pretrain" / "checkpoints").iterdir()) + sorted(
        (run / "decoder_spatial_context" / "checkpoints").iterdir())
    before = [p.stat().st_mtime_ns for p in checkpoints]
    monkeypatch.setattr(budget, "refit_decoders", no_refit)
    recipe.main(["--out-dir", str(run), "--profile", "smoke", "--export", str(export)])
    assert [p.stat().st_mtime_ns for p in checkpoints] == before  # resumed at their last step: nothing trained
    for name in ("pretrain/model/model.safetensors", decoder_weights, "bank.safetensors",
                 "eval/probe_group.safetensors"):
        written, first = load_file(run / name), load_file(original / name)
        assert written.keys() == first.keys() and all(torch.equal(written[k], first[k]) for k in first), name
    results, first = (json.loads((folder / "eval" / "results.json").read_text()) for folder in (run, original))
    for own in ("checkpoint", "seconds"):  # where and how long, not what it measured
        results.pop(own), first.pop(own)
    assert results == first
    assert_bundle_parts_agree(export)
    assert_a_box_produces_sketches(export)


def test_a_damaged_model_with_no_checkpoint_to_write_it_from_is_refused_before_anything_changes(run, tmp_path):
    export = tmp_path / "export"
    (run / "pretrain" / "model" / "model.safetensors").write_bytes(b"")
    shutil.rmtree(run / "pretrain" / "checkpoints")
    with pytest.raises(ValueError, match="no checkpoint of the finished run .* to write it again from: delete"):
        recipe.main(["--out-dir", str(run), "--profile", "smoke", "--export", str(export)])
    assert not export.exists() and (run / "bank.safetensors").is_file()


def test_outputs_of_a_model_trained_on_since_are_not_taken_for_damage(run):
    """A review extended a finished run's pretraining (--resume --steps 6 --allow-changes steps), and the next call
    deleted the decoders, evaluation, bank and bundle as 'damaged' (another model's signature) before refusing the
    changed settings. Files that read fine are left alone; the settings check refuses as before."""
    from train import pretrain

    pretrain.main(["--config", str(run / "pretrain" / "config.yaml"), "--out-dir", str(run / "pretrain"),
                   "--resume", "true", "--steps", "6", "--allow-changes", "steps", "--knn-every", "0"])
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*") if "pretrain" not in p.parts)
    with pytest.raises(ValueError, match=r"pretrain was trained with other settings \(steps: 6 -> 3\)"):
        recipe.main(["--out-dir", str(run), "--profile", "smoke"])
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if "pretrain" not in p.parts) == before


def test_a_damaged_decoder_with_no_checkpoint_is_not_trained_again_unasked(run):
    weights = run / "decoder_pooled" / "decoder" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    shutil.rmtree(run / "decoder_pooled" / "checkpoints")
    advice = f"delete {run / 'decoder_pooled'} and {run / 'decoder_eval'} to train this decoder again"
    with pytest.raises(ValueError, match="no checkpoint is left .* to export it again from: " + advice):
        recipe.main(["--out-dir", str(run), "--profile", "smoke"])
    assert weights.is_file() and (run / "decoder_eval" / "results.json").is_file()  # nothing deleted
    shutil.rmtree(run / "decoder_pooled")  # the advice, followed: that decoder alone is trained again
    shutil.rmtree(run / "decoder_eval")
    recipe.main(["--out-dir", str(run), "--profile", "smoke"])
    assert (run / "bundle" / "decoder_paper" / "config.json").is_file()


def test_choosing_examples_again_for_a_bundle_with_a_damaged_metrics_file_changes_nothing(smoke_run, tmp_path):
    from train import examples

    bundle = shutil.copytree(smoke_run / "bundle", tmp_path / "bundle")
    (bundle / "metrics.json").write_text("")
    before = sorted(p.name for p in (bundle / "examples").iterdir())
    with pytest.raises(ValueError, match="metrics.json is damaged .*nothing was changed"):
        examples.main(["--bundle", str(bundle)])
    assert sorted(p.name for p in (bundle / "examples").iterdir()) == before
    assert not list(bundle.glob("examples.swap-*"))


class Stopped(RuntimeError):
    pass


def test_a_call_stopped_mid_recipe_keeps_the_times_of_the_stages_it_finished(run, monkeypatch):
    """The GPU recipe may take two calls (the device's per-call limit): the card must still count every stage."""
    first = json.loads((run / "summary.json").read_text())["stage_seconds"]
    (run / "summary.json").unlink()  # the stopped call never wrote one
    (run / "decoder_eval" / "results.json").unlink()
    real = recipe.run_decoder_eval

    def stopped(*args):
        raise Stopped("the per-call limit")

    monkeypatch.setattr(recipe, "run_decoder_eval", stopped)
    monkeypatch.setattr(budget, "refit_decoders", no_refit)
    with pytest.raises(Stopped):
        recipe.main(["--out-dir", str(run), "--profile", "smoke"])
    monkeypatch.setattr(recipe, "run_decoder_eval", real)
    recipe.main(["--out-dir", str(run), "--profile", "smoke"])
    again = json.loads((run / "summary.json").read_text())["stage_seconds"]
    for stage in ("pretrain", "eval", "bank", "decoders"):
        assert again[stage] == first[stage]
    assert again["eval"] > 1 and again["decoder_eval"] > 1


def test_an_out_dir_that_is_a_file_is_refused_before_anything_changes(tmp_path):
    mistaken = tmp_path / "notes.txt"
    mistaken.write_text("mine")
    with pytest.raises(ValueError, match="notes.txt is a file: --out-dir names the run's folder"):
        recipe.main(["--out-dir", str(mistaken), "--profile", "smoke"])
    assert mistaken.read_text() == "mine"


def test_extra_flags_reach_the_stage_that_has_them():
    flags = recipe.route_flags(["--num-workers", "3", "--ema-start=0.995", "--decoder.steps", "7",
                                "--pretrain.lr", "5e-4", "--block-out-channels", "16,32,64"])
    assert flags["pretrain"] == ["--num-workers", "3", "--ema-start", "0.995", "--lr", "5e-4"]
    assert flags["decoder"] == ["--num-workers", "3", "--steps", "7", "--block-out-channels", "16,32,64"]


@pytest.mark.parametrize("extra, message", [
    (["--steps", "5"], "write --pretrain.steps or --decoder.steps"),
    (["--no-such-setting", "1"], "unknown setting --no-such-setting"),
    (["--decoder.ema-start", "0.9"], "unknown setting --decoder.ema-start"),
    (["--checkpoint", "x"], "set by the recipe itself"),
    (["--lr"], "needs a value"),
])
def test_a_bad_extra_flag_stops_the_recipe_before_any_stage(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        recipe.main(["--out-dir", str(tmp_path / "run"), "--profile", "smoke", *extra])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_run_goes_on_with_its_own_profile_on_any_machine(run):
    """Without --profile a CPU machine used to switch a GPU run to the cpu profile and refuse its stages."""
    weights = run / "pretrain" / "model" / "model.safetensors"
    before = weights.read_bytes()
    recipe.main(["--out-dir", str(run)])  # the smoke run, on a machine whose default profile is another
    assert json.loads((run / "summary.json").read_text())["profile"] == "smoke"
    assert weights.read_bytes() == before  # every stage was finished and is reused
    with pytest.raises(ValueError, match="is a run of the smoke profile: pass --profile smoke"):
        recipe.main(["--out-dir", str(run), "--profile", "cpu"])


def test_a_new_run_takes_the_gpu_profile_where_cuda_is_and_the_cpu_one_elsewhere(tmp_path, monkeypatch):
    """`python -m train.default` with no --profile must use the GPU a user has (and not ask for one they lack)."""
    for cuda, expected in ((True, "gpu"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert recipe.choose_profile(tmp_path, None, None) == expected
        assert recipe.choose_profile(tmp_path, None, "smoke") == "smoke"  # asked for: taken as asked


@pytest.mark.parametrize("stage", ["pretrain", "decoder"])
def test_a_length_given_is_not_mixed_with_a_budget_plan(tmp_path, stage):
    """Before, the plan's shortened warmup went with a given pretraining length, and the card reported the plan's
    fraction; a given decoder length ran as given while the plan had fitted pretraining around the profile's, so a
    90-minute plan could take three hours."""
    with pytest.raises(ValueError, match=f"--{stage}.steps fixes a length the budget plan sets: add --budget-minutes"):
        recipe.main(["--out-dir", str(tmp_path / "run"), "--profile", "smoke", "--budget-minutes", "5",
                     f"--{stage}.steps", "3"])
    # nothing timed or trained, and no command recorded: the card quoted a refused call as the run's first
    assert not any((tmp_path / "run").iterdir())


def test_a_run_planned_by_an_older_version_keeps_its_decoder_length(tmp_path, monkeypatch):
    """Versions before 2026-12-07 let --decoder.steps through under a plan: such a run must still finish as it was
    started (its given length, not refitted), where a new plan refuses the flag."""
    (tmp_path / budget.PLAN_NAME).write_text("{}")
    monkeypatch.setattr(budget, "load_or_make_plan", lambda out, minutes, make: {"pretrain_steps": 8,
                        "pretrain_warmup_steps": 1, "decoder_steps": 40})
    flags, profile = {"pretrain": [], "decoder": ["--steps", "7"]}, dict(recipe.PROFILES["smoke"])
    plan = recipe.fit_to_budget(profile, tmp_path, flags, None)
    monkeypatch.setattr(budget, "refit_decoders", lambda *args, **kwargs: pytest.fail("a given length was refitted"))
    assert recipe.refit_to_budget(plan, profile, 100, tmp_path, flags, spent_s=12.0) is plan
    assert flags["decoder"] == ["--steps", "7"]  # the length it was started with, which decoder_config puts last


def test_a_run_started_before_commits_were_recorded_is_not_credited_to_this_one():
    assert recipe.started_code({}) == recipe.code_version()  # a new run: this checkout's
    assert recipe.started_code({"profile": "cpu", "command": "python -m train.default"}).startswith("unknown")
    assert recipe.started_code({"profile": "cpu"}).startswith("unknown")  # summary.json only
    assert recipe.started_code({"profile": "cpu", "command": "c", "code": "21bb7b3"}) == "21bb7b3"


def test_the_decoder_schedule_follows_the_decoder_length_given(tmp_path):
    """Warmup, sample grids and checkpoints follow --decoder.steps, not the profile's length."""
    profile, model = dict(recipe.PROFILES["cpu"]), tmp_path / "model"
    given = recipe.decoder_config(model, profile, tmp_path / "d", "pooled", ["--steps", "1500"])
    assert (given.steps, given.warmup_steps, given.sample_every, given.ckpt_every) == (1500, 75, 375, 375)
    assert recipe.decoder_config(model, profile, tmp_path / "d", "pooled",
                                 ["--steps", "1500", "--warmup-steps", "10"]).warmup_steps == 10
    default = recipe.decoder_config(model, profile, tmp_path / "d", "pooled", [])
    assert (default.steps, default.warmup_steps, default.sample_every, default.ckpt_every) == (500, 25, 125, 125)


def test_a_finished_stage_is_not_reused_with_other_settings(run):
    weights = run / "pretrain" / "model" / "model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(ValueError, match="predictor_depth: 1 -> 2"):
        recipe.main(["--out-dir", str(run), "--profile", "smoke", "--pretrain.predictor-depth", "2"])
    with pytest.raises(ValueError, match="--pretrain.steps fixes a length the budget plan sets"):
        recipe.main(["--out-dir", str(run), "--profile", "smoke", "--pretrain.steps", "4"])  # a planned run
    assert weights.read_bytes() == before


def test_outputs_made_from_a_model_about_to_be_retrained_stop_the_recipe(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)  # as if pretrain/ had been deleted after a finished run
    (run / "eval" / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="holds outputs of eval made from a model"):
        recipe.main(["--out-dir", str(run), "--profile", "smoke"])
    assert sorted(p.name for p in run.iterdir()) == ["eval"]


def test_the_commands_the_card_quotes_can_be_pasted_into_a_shell(tmp_path):
    """A run folder with a space in its path was quoted as two arguments; a damaged metrics.json is one error."""
    saved = {**config_dict(decoder_training.DecoderTrainConfig()), "checkpoint": "my runs/model",
             "out_dir": "my runs/dec", "steps": 7}
    command = replacing.training_command(saved)
    parsed = shlex.split(command)
    assert parsed[parsed.index("--checkpoint") + 1] == "my runs/model" and parsed[parsed.index("--steps") + 1] == "7"
    (tmp_path / "metrics.json").write_text('{"command": ')
    with pytest.raises(ValueError, match="metrics.json is not valid JSON"):
        replacing.replace_decoder(tmp_path, tmp_path / "run", tmp_path / "eval", "x")


def test_choosing_examples_without_a_group_probe_says_what_is_missing(tmp_path):
    from helpers import tiny_bundle
    from train.examples import choose_examples

    bundle = tiny_bundle(tmp_path / "b")
    for path in bundle.glob("probe_group.*"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match="probe_group.safetensors is missing"):  # was KeyError: 'group'
        choose_examples(bundle, tmp_path / "examples")
