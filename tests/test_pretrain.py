"""The pretraining loop: loss falls, a killed run resumes exactly, NaNs stop it, DDP ranks stay identical; bf16 only
where the hardware has it."""
import csv
import json
import logging
import math
import os
import re
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY_DECODER, run_on_two_gloo_ranks, train_on_two_gloo_ranks
import train.pretrain as pretrain
from ijepa.bundle import build_random_bundle
from ijepa.checkpoint import CheckpointError, load_model, save_model
from ijepa.inference import true_features
from ijepa.model import IJepa, IJepaConfig
from ijepa.vision_transformer import set_fused_attention
from train.config import changed_settings, config_dict, parse_config
from train.eval import LinearProbe, evaluate_emoji_features, save_probe
from train.export_checkpoint import export_checkpoint, newest_checkpoint
from train.objective import TargetFeatures, target_spread
from train.pretrain import PretrainConfig, train
from ijepa.device import resolve_precision
from train.decoder import DecoderTrainConfig
from train.runtime import (LossWindow, Runtime, elapsed_by_step, list_checkpoints, load_checkpoint, resume_state,
                           save_checkpoint, save_folder_atomic, start_csv_log, write_file_atomic, write_json_atomic)

REPO = Path(__file__).resolve().parents[1]
TINY = ["--img-size", "32", "--patch-size", "4", "--depth", "1", "--predictor-depth", "1", "--predictor-embed-dim",
        "48", "--batch-size", "8", "--warmup-steps", "2", "--num-workers", "0", "--log-every", "1",
        "--precision", "fp32"]


# What a pretraining checkpoint holds, with nothing in it: for tests of how checkpoints are found and kept
EMPTY_STATE = {"model": {}, "optimizer": {}, "step": 0, "config": {}}


def tiny(out_dir, *extra) -> PretrainConfig:
    return parse_config(PretrainConfig, TINY + ["--out-dir", str(out_dir), *extra])


def losses(out_dir) -> list[float]:
    with open(Path(out_dir) / "log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_cli_yaml_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.002\ntarget_scale: [0.1, 0.2]\nsteps: 7\n")
    cfg = parse_config(PretrainConfig, ["--config", str(tmp_path / "c.yaml"), "--steps", "9", "--compile", "true"])
    assert (cfg.lr, cfg.target_scale, cfg.steps, cfg.compile) == (0.002, (0.1, 0.2), 9, True)
    (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown config keys"):
        parse_config(PretrainConfig, ["--config", str(tmp_path / "bad.yaml")])
    # an optional setting a file gives can be set back to its default, none, by a flag (and only an optional one)
    (tmp_path / "depth.yaml").write_text("depth: 6\n")
    assert parse_config(PretrainConfig, ["--config", str(tmp_path / "depth.yaml")]).depth == 6
    assert parse_config(PretrainConfig, ["--config", str(tmp_path / "depth.yaml"), "--depth", "None"]).depth is None
    with pytest.raises(SystemExit):
        parse_config(PretrainConfig, ["--steps", "none"])


def test_config_files_are_read_as_the_settings_types_and_impossible_values_refused(tmp_path):
    # YAML reads 1e-3 (no dot) as a string: the config turns it into the float the field is
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nsteps: '40'\nmain_scale: [1, 0.9]\n")
    cfg = parse_config(PretrainConfig, ["--config", str(tmp_path / "c.yaml")])
    assert (cfg.lr, cfg.steps, cfg.main_scale) == (0.001, 40, (1.0, 0.9))
    assert isinstance(cfg.main_scale[0], float)
    # text where YAML users write it so, and lists written as flags write them
    (tmp_path / "c.yaml").write_text("steps: 1e4\nresume: 'false'\ntarget_scale: 0.1,0.2\nallow_changes: lr\n")
    cfg = parse_config(PretrainConfig, ["--config", str(tmp_path / "c.yaml")])
    assert (cfg.steps, cfg.resume, cfg.target_scale, cfg.allow_changes) == (10000, False, (0.1, 0.2), ("lr",))
    for text, message in [("lr: fast", "config key lr: expected a number, got 'fast'"),
                          ("steps: 3.5", "config key steps: expected a whole number, got 3.5"),
                          ("steps: null", "config key steps: expected a whole number, got null"),
                          ("batch_size: [1, 2]", "config key batch_size: expected a whole number"),
                          ("target_scale: 0.5", "config key target_scale: expected 2 values written a,b"),
                          ("data: 5", "config key data: expected text, got 5"),
                          ("compile: maybe", "config key compile: expected true or false")]:
        (tmp_path / "bad.yaml").write_text(text + "\n")
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_config(PretrainConfig, ["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(ValueError, match="config key context_scale: expected 2 values"):
        parse_config(PretrainConfig, ["--context-scale", "0.9"])  # a flag, like the file
    for flags, message in [(["--lr", "nan"], "lr must be positive, got nan"),
                            (["--lr", "-1"], "lr must be positive"),
                            (["--final-weight-decay", "-0.1"], "final_weight_decay must be 0 or more"),
                            (["--ema-start", "2"], "ema_start must be between 0 and 1, got 2.0"),
                            (["--seed", "-1"], "seed must be 0 or more, got -1"),  # numpy takes no negative seed
                            (["--patch-size", "0"], "patch_size must be positive")]:  # was timm's ZeroDivisionError
        with pytest.raises(ValueError, match=message):
            parse_config(PretrainConfig, flags)
    with pytest.raises(ValueError, match="log_every must be positive"):
        parse_config(PretrainConfig, ["--log-every", "0"])


def test_resuming_with_another_number_of_processes_is_refused(tmp_path):
    cfg = tiny(tmp_path / "run", "--resume", "true")
    save_checkpoint({**EMPTY_STATE, "step": 3, "config": config_dict(cfg), "world_size": 2}, tmp_path / "ckpt", 3, 2)
    assert resume_state(tmp_path / "ckpt", cfg, world_size=2)[0]["step"] == 3
    with pytest.raises(ValueError, match="written by 2 process.*this run has 1"):
        resume_state(tmp_path / "ckpt", cfg, world_size=1)
    # under torchrun every rank continues from the newest checkpoint, not an older one
    save_checkpoint({**EMPTY_STATE, "step": 6, "config": config_dict(cfg), "world_size": 2}, tmp_path / "ckpt", 6, 2)
    state, path = resume_state(tmp_path / "ckpt", cfg, world_size=2)
    assert state["step"] == 6 and path.name == "ckpt-00000006.pt"


def test_a_checkpoint_older_than_a_setting_resumes_only_with_its_default():
    saved = config_dict(PretrainConfig())
    del saved["target_norm"]  # written before the setting existed: that run predicted the paper's target
    assert changed_settings(saved, PretrainConfig()) == ""
    assert changed_settings(saved, PretrainConfig(target_norm="instance")) == "target_norm: 'layer' -> 'instance'"


def test_a_run_continues_when_its_paths_are_written_another_way(tmp_path, monkeypatch):
    """`--out-dir runs/x` after `--out-dir /home/me/runs/x` is the same run, not one with other settings."""
    monkeypatch.chdir(tmp_path)
    saved = config_dict(DecoderTrainConfig(checkpoint=str(tmp_path / "runs" / "model")))
    assert changed_settings(saved, DecoderTrainConfig(checkpoint="runs/model")) == ""
    assert changed_settings(saved, DecoderTrainConfig(checkpoint="runs/other")).startswith("checkpoint: ")


def test_a_run_moved_with_the_model_beside_it_continues(tmp_path):
    """The recipe's decoders name their model ``<run>/pretrain/model``: after the whole run folder is moved (or
    copied), a finished stage is reused and a stopped one resumes; a model at another place is still a change."""
    before, after = tmp_path / "scratch" / "run", tmp_path / "home" / "run"
    saved = config_dict(DecoderTrainConfig(checkpoint=str(before / "pretrain" / "model"),
                                           out_dir=str(before / "decoder_spatial_context")))
    moved = DecoderTrainConfig(checkpoint=str(after / "pretrain" / "model"),
                               out_dir=str(after / "decoder_spatial_context"))
    assert changed_settings(saved, moved) == ""
    elsewhere = DecoderTrainConfig(checkpoint=str(after / "other" / "model"),
                                   out_dir=str(after / "decoder_spatial_context"))
    assert changed_settings(saved, elsewhere).startswith("checkpoint: ")
    stayed = DecoderTrainConfig(checkpoint=str(after / "pretrain" / "model"),
                                out_dir=str(before / "decoder_spatial_context"))
    assert changed_settings(saved, stayed).startswith("checkpoint: ")  # the run did not move: another model


def test_scene_settings_reach_the_world_the_run_trains_on(tmp_path, monkeypatch):
    built = []
    real = pretrain.build_dataset
    monkeypatch.setattr(pretrain, "build_dataset", lambda *a, **kw: built.append(real(*a, **kw)) or built[-1])
    train(tiny(tmp_path / "run", "--steps", "1", "--num-distractors", "2,2", "--main-scale", "0.6,0.6",
               "--distractor-scale", "0.25,0.25", "--balance", "subgroup", "--theme-prob", "0.5", "--theme", "group"))
    (scenes,) = built
    layout = scenes.layout(5)
    assert len(layout.objects) == 3 and scenes.balance == "subgroup"
    assert (scenes.theme_prob, scenes.theme) == (0.5, "group")
    assert sorted(o.size for o in layout.objects) == [round(0.25 * 32)] * 2 + [round(0.6 * 32)]


class Killed(RuntimeError):
    pass


def test_killed_run_resumes_exactly(tmp_path, monkeypatch):
    full = train(tiny(tmp_path / "full", "--steps", "6", "--ckpt-every", "3"))
    assert (tmp_path / "full" / "loss.png").is_file() and (tmp_path / "full" / "model" / "config.json").is_file()

    real_loss, calls = pretrain.ijepa_loss, {"n": 0}

    def dies_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Killed("simulated kill")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(pretrain, "ijepa_loss", dies_at_step_5)
    with pytest.raises(Killed):
        train(tiny(tmp_path / "cut", "--steps", "6", "--ckpt-every", "3"))
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["ckpt-00000003.pt"]
    monkeypatch.setattr(pretrain, "ijepa_loss", real_loss)
    with pytest.raises(FileExistsError, match="--resume"):  # never silently overwrites a run
        train(tiny(tmp_path / "cut", "--steps", "6", "--ckpt-every", "3"))
    config_before = (tmp_path / "cut" / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"lr: 0\.001 -> 0\.002"):  # other settings would not continue exactly
        train(tiny(tmp_path / "cut", "--steps", "6", "--ckpt-every", "3", "--resume", "true", "--lr", "0.002"))
    assert (tmp_path / "cut" / "config.yaml").read_text() == config_before
    resumed = train(tiny(tmp_path / "cut", "--steps", "6", "--ckpt-every", "3", "--resume", "true",
                         "--device", "cpu", "--keep-last", "5"))  # run-only settings may change

    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # same curve, row for row
    with open(tmp_path / "cut" / "log.csv") as f:
        elapsed = [float(r["elapsed_s"]) for r in csv.DictReader(f)]
    assert elapsed == sorted(elapsed)  # the resumed part counts on from the checkpoint's time, not from 0
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_truncated_newest_checkpoint_resumes_from_the_one_before(tmp_path, caplog):
    """Checkpoints are written whole or not at all, but a copied or damaged run folder can end in a cut one: the
    run continues from the one before it and still matches. The bad file is kept aside, out of keep_last's count."""
    full = train(tiny(tmp_path / "full", "--steps", "6", "--ckpt-every", "2", "--keep-last", "3"))
    shutil.copytree(tmp_path / "full", tmp_path / "copy")
    checkpoints = tmp_path / "copy" / "checkpoints"
    (checkpoints / "ckpt-00000006.pt").unlink()
    newest = checkpoints / "ckpt-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:4000])
    with caplog.at_level(logging.WARNING):
        resumed = train(tiny(tmp_path / "copy", "--steps", "6", "--ckpt-every", "2", "--keep-last", "3",
                             "--resume", "true"))
    assert "ckpt-00000004.pt: cannot read" in caplog.text and "trying the checkpoint before it" in caplog.text
    assert len((checkpoints / "ckpt-00000004.pt.unreadable").read_bytes()) == 4000  # kept as it was
    assert losses(tmp_path / "copy") == losses(tmp_path / "full")
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert load_checkpoint(newest)["step"] == 4  # written again, whole


def test_a_run_whose_every_checkpoint_is_unreadable_is_not_restarted_by_a_second_resume(tmp_path):
    cfg = tiny(tmp_path / "run", "--resume", "true")
    path = save_checkpoint({"step": 3, "config": config_dict(cfg), "world_size": 1}, tmp_path / "ckpt", 3, 2)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints"):
        resume_state(tmp_path / "ckpt", cfg)
    with pytest.raises(CheckpointError, match="holds only checkpoints that could not be read.*ckpt-00000003.pt"):
        resume_state(tmp_path / "ckpt", cfg)  # the same command again (a requeued job): not from step 0 silently
    (tmp_path / "ckpt" / "ckpt-00000003.pt.unreadable").unlink()
    assert resume_state(tmp_path / "ckpt", cfg) == (None, None)  # deleted on purpose: a new run


def test_a_resume_on_an_image_folder_whose_files_changed_says_the_run_now_differs(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
    args = ("--data", str(images), "--ckpt-every", "1", "--allow-changes", "steps")
    train(tiny(tmp_path / "run", "--steps", "1", *args))
    # what the app shows under "Trained on": the folder, not the emoji world's default
    assert load_model(tmp_path / "run" / "model").config.trained_on == "images in the folder 'images'"
    with caplog.at_level(logging.WARNING):
        train(tiny(tmp_path / "run", "--steps", "2", "--resume", "true", *args))  # the same files: nothing said
    assert "image folder changed" not in caplog.text
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(images / "new.png")
    with caplog.at_level(logging.WARNING):
        train(tiny(tmp_path / "run", "--steps", "3", "--resume", "true", *args))
    assert "image folder changed since" in caplog.text and "(6 images, sha1" in caplog.text
    assert "7 images, sha1" in caplog.text and "differs from an uninterrupted run" in caplog.text



def test_a_resume_after_the_emoji_catalog_changed_refuses(tmp_path, monkeypatch):
    """An updated emoji-test.txt (or font) moves emoji in or out of the held-out split: going on would train on
    emoji the evaluation holds out, so the run stops and says why, also from a checkpoint written before the
    catalog's fingerprint was stored beside the data's."""
    from train.emoji import DEFAULT_EMOJI_TEST_PATH, EMOJI_TEST_ENV
    lines = Path(DEFAULT_EMOJI_TEST_PATH).read_text(encoding="utf-8").splitlines()
    older = tmp_path / "emoji-test-older.txt"  # one emoji fewer: another catalog, another split
    older.write_text("\n".join(line for line in lines if "smiling face with halo" not in line) + "\n",
                     encoding="utf-8")
    monkeypatch.setenv(EMOJI_TEST_ENV, str(older))
    train(tiny(tmp_path / "run", "--steps", "1", "--ckpt-every", "1"))
    monkeypatch.delenv(EMOJI_TEST_ENV)
    resumed = tiny(tmp_path / "run", "--steps", "2", "--resume", "true", "--allow-changes", "steps")
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"ckpt-00000001.pt: the emoji catalog changed since .*held-out split"):
        train(resumed)
    assert (tmp_path / "run" / "config.yaml").read_text() == recorded  # "nothing was overwritten" holds
    checkpoint = tmp_path / "run" / "checkpoints" / "ckpt-00000001.pt"
    state = load_checkpoint(checkpoint)
    assert state["data_fingerprint"] == state["model_config"]["data_fingerprint"]
    del state["data_fingerprint"]  # as checkpoints were written before
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match="the emoji catalog changed since"):
        train(resumed)
    assert load_checkpoint(checkpoint)["step"] == 1  # nothing lost


def test_an_interrupted_overwrite_leaves_the_old_file_whole(tmp_path):
    """metrics.json, the probes, the budget plan: a write stopped half-way never shows under the final name."""
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"a": 1})

    def stopped_half_way(tmp):
        assert tmp != target and json.loads(target.read_text()) == {"a": 1}  # not written in place
        tmp.write_text('{"a": ')
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        write_file_atomic(target, stopped_half_way)
    assert json.loads(target.read_text()) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_kill_during_a_folder_swap_is_finished_or_cleaned_by_the_next_save(tmp_path, monkeypatch):
    """Killed between its two renames, a swap left no folder at all (the app would find no assets); killed mid-write
    it left a swap folder for good. The next save of the same folder finishes the one and removes the other."""
    target = tmp_path / "assets"
    save_folder_atomic(lambda folder: (folder.mkdir(), (folder / "v").write_text("1")), target)
    real_replace, calls = os.replace, {"n": 0}

    def killed_at_the_second_rename(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_folder_atomic(lambda folder: (folder.mkdir(), (folder / "v").write_text("2")), target)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not target.exists() and len(list(tmp_path.glob("assets.swap-*"))) == 1
    with pytest.raises(KeyboardInterrupt):  # the next save is itself killed mid-write, but finishes the swap first
        save_folder_atomic(lambda folder: (_ for _ in ()).throw(KeyboardInterrupt), target)
    assert (target / "v").read_text() == "2" and not list(tmp_path.glob("assets.swap-*"))
    (tmp_path / "assets.swap-left").mkdir()  # a kill mid-write in an older version left this
    save_folder_atomic(lambda folder: (folder.mkdir(), (folder / "v").write_text("3")), target)
    assert (target / "v").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["assets"]


def test_saved_weights_are_readable_as_the_umask_allows(tmp_path):
    """safetensors (so diffusers' save_pretrained too) writes its files 0600: on a shared machine a model, a probe
    or a decoder someone trained was unreadable by the colleague meant to run the app on it."""
    from safetensors.torch import save_file
    old = os.umask(0o022)
    config = IJepaConfig(img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2, predictor_embed_dim=8,
                         predictor_depth=1, predictor_num_heads=2)
    try:
        save_model_dir = tmp_path / "model"
        save_model(IJepa(config), save_model_dir)
        save_probe(LinearProbe(8, 3), ["a", "b", "c"], tmp_path / "probe")
        save_folder_atomic(lambda folder: (folder.mkdir(), save_file({"w": torch.zeros(2)}, folder / "weights")),
                           tmp_path / "decoder")  # what save_pretrained does inside train.decoder's save
        bundle = build_random_bundle(tmp_path / "bundle", config, decoder_kwargs=TINY_DECODER, num_examples=0)
        files = [save_model_dir / "model.safetensors", tmp_path / "probe.safetensors", tmp_path / "decoder" / "weights",
                 *sorted(bundle.rglob("*.safetensors"))]
        assert {str(f): oct(f.stat().st_mode & 0o777) for f in files} == {str(f): "0o644" for f in files}
        assert len(files) == 3 + 6  # the bundle's model, both decoders, both probes and the bank
    finally:
        os.umask(old)


def test_a_kill_while_the_model_is_exported_leaves_no_folder_that_looks_finished(tmp_path, monkeypatch):
    """config.json marks pretraining finished for train.default: written in place, a kill left it empty and every
    later call stopped on it."""
    monkeypatch.setattr(pretrain, "plot_loss_curve", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # stopped right after the export: the folder is whole
        train(tiny(tmp_path / "run", "--steps", "1"))
    assert load_model(tmp_path / "run" / "model").config.depth == 1
    import ijepa.checkpoint
    monkeypatch.setattr(ijepa.checkpoint, "save_file", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # stopped while writing the weights: the whole folder stays as it was
        train(tiny(tmp_path / "again", "--steps", "1"))
    assert not (tmp_path / "again" / "model").exists() and not list((tmp_path / "again").glob("model.swap-*"))


def test_resume_in_an_empty_folder_says_it_starts_a_new_run(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        train(tiny(tmp_path / "new", "--steps", "1", "--resume", "true"))
    assert "no checkpoint in" in caplog.text and "starting the run from step 0" in caplog.text


def test_a_resume_past_the_new_end_is_refused_and_leaves_the_run_as_it_was(tmp_path):
    """--steps lowered below the checkpoint's step trained nothing, yet rewrote config.yaml to the shorter run."""
    train(tiny(tmp_path / "run", "--steps", "6", "--ckpt-every", "6"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"ckpt-00000006.pt: it is at step 6, past --steps 4\. Resume with "
                                         r"--steps 6 or more"):
        train(tiny(tmp_path / "run", "--steps", "4", "--resume", "true", "--allow-changes", "steps"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("device, message", [("cdua", "unknown device 'cdua'"), ("mps", "mps")])
def test_a_device_typo_is_refused_under_torchrun_too(monkeypatch, device, message):
    """Under torchrun only 'cuda*' was looked at: any other value trained every rank on the CPU without a word."""
    from train.runtime import setup_runtime

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # refused for torchrun, not as absent
    with pytest.raises(ValueError, match=message):
        setup_runtime(device)


def test_a_decoder_checkpoint_given_to_the_export_says_what_it_is(tmp_path):
    path = tmp_path / "ckpt-00000004.pt"
    torch.save({"step": 4, "config": {}, "optimizer": {}, "decoder": {}}, path)
    with pytest.raises(ValueError, match="a checkpoint of train.decoder, not of train.pretrain; a decoder run exports"):
        export_checkpoint(path)
    (tmp_path / "README.md").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="expected a ckpt-<step>.pt file written by train.pretrain$"):
        export_checkpoint(tmp_path / "README.md")


def test_any_kept_checkpoint_exports_as_a_model_folder(tmp_path):
    finished = train(tiny(tmp_path / "run", "--steps", "4", "--ckpt-every", "2"))
    middle = export_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt-00000002.pt")
    assert middle == tmp_path / "run" / "model_2"
    newest = export_checkpoint(newest_checkpoint(tmp_path / "run"), tmp_path / "last")
    for (name, a), b in zip(finished.state_dict().items(), load_model(newest).state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # the last step is the run's own export
    assert load_model(middle).config == finished.config

    class OtherCatalog:  # another machine's emoji font and emoji-test.txt
        fingerprint = "not the catalog the run trained on"

    with pytest.MonkeyPatch.context() as patch:  # exported elsewhere, the model still names the data it trained on
        patch.setattr(pretrain, "get_catalog", OtherCatalog)
        elsewhere = export_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt-00000002.pt", tmp_path / "elsewhere")
    assert load_model(elsewhere).config == finished.config and finished.config.data_fingerprint
    assert any((a != b).any() for a, b in zip(finished.state_dict().values(), load_model(middle).state_dict().values()))

    truncated = tmp_path / "ckpt-00000009.pt"
    truncated.write_bytes((tmp_path / "run" / "checkpoints" / "ckpt-00000004.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="ckpt-00000009.pt: cannot read this file as a PyTorch checkpoint"):
        export_checkpoint(truncated)
    copied = tmp_path / "copied"  # a run copied while its newest checkpoint was being written
    shutil.copytree(tmp_path / "run" / "checkpoints", copied / "checkpoints")
    shutil.copy(truncated, copied / "checkpoints")
    assert newest_checkpoint(copied) == copied / "checkpoints" / "ckpt-00000004.pt"  # the newest complete one
    with pytest.raises(FileNotFoundError, match="is a model folder already"):
        newest_checkpoint(tmp_path / "last")
    for taken in (tmp_path / "last", tmp_path / "run" / "checkpoints"):  # another export, the run's own files
        before = sorted((p.name, p.stat().st_mtime_ns) for p in taken.iterdir())
        with pytest.raises(FileExistsError, match="already exists and is not an empty folder"):
            export_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt-00000002.pt", taken)
        assert sorted((p.name, p.stat().st_mtime_ns) for p in taken.iterdir()) == before
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        newest_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        newest_checkpoint(tmp_path / "no_such_run")


def test_checkpoints_keep_the_newest_and_a_failed_write_leaves_the_last_one_whole(tmp_path, monkeypatch):
    """--keep-last prunes the OLDEST; a write killed midway never replaces or hides the previous checkpoint."""
    for step in (1, 2, 3):
        save_checkpoint({**EMPTY_STATE, "step": step}, tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]

    def dies_midway(state, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({**EMPTY_STATE, "step": 4}, tmp_path, 4, keep_last=2)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    assert load_checkpoint(tmp_path / "ckpt-00000003.pt")["step"] == 3


@pytest.mark.parametrize("window_losses", [[float("inf")], [1.0, float("nan")], [0.5, 0.5, float("-inf"), 0.5]])
def test_one_non_finite_loss_in_a_window_stops_the_run(tmp_path, window_losses):
    """A single NaN or inf step (not only a NaN, not only a majority) makes the weights suspect."""
    window = LossWindow(Runtime(device=torch.device("cpu")), tmp_path)
    for loss in window_losses:
        window.add(torch.tensor(loss))
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        window.close(len(window_losses))


def test_settings_are_read_as_their_types_and_a_changed_batch_size_refuses_to_resume():
    """Typos in booleans are refused, integer tuples stay integers, and batch size is part of what a run is."""
    with pytest.raises(SystemExit):
        parse_config(PretrainConfig, ["--compile", "flase"])
    assert all(type(v) is int for v in parse_config(PretrainConfig, ["--num-distractors", "2,3"]).num_distractors)
    saved = config_dict(PretrainConfig())
    assert "batch_size" in changed_settings(saved, PretrainConfig(batch_size=PretrainConfig().batch_size + 1))


def test_a_finite_loss_with_nan_gradients_is_not_checkpointed(tmp_path, monkeypatch):
    """Step 3's loss stays finite but its gradient is NaN (as an overflow in the backward gives): its update makes
    every weight NaN. The step-4 checkpoint would have held them and been named the last good one."""
    real_loss, calls = pretrain.ijepa_loss, {"n": 0}

    def nan_gradient_at_step_3(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss + torch.sqrt(loss * 0) if calls["n"] == 3 else loss  # value unchanged, d/dloss = inf * 0

    monkeypatch.setattr(pretrain, "ijepa_loss", nan_gradient_at_step_3)
    with pytest.raises(FloatingPointError, match=r"weights became NaN/inf by step 4.*ckpt-00000002.pt"):
        train(tiny(tmp_path / "run", "--steps", "8", "--ckpt-every", "2", "--log-every", "4"))
    saved = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in saved] == ["ckpt-00000002.pt"]
    assert all(torch.isfinite(v).all() for v in load_checkpoint(saved[-1])["model"].values())


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss, calls = pretrain.ijepa_loss, {"n": 0}

    def nan_from_step_5(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 5 else loss

    monkeypatch.setattr(pretrain, "ijepa_loss", nan_from_step_5)
    with pytest.raises(FloatingPointError, match="ckpt-00000004.pt") as stopped:
        train(tiny(tmp_path / "run", "--steps", "8", "--ckpt-every", "2"))
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")][-1] == "ckpt-00000004.pt"

    # the advice the message gives works: go on from that checkpoint with a lower lr, said on purpose
    assert "--resume true --lr <lower> --allow-changes lr" in str(stopped.value)
    monkeypatch.setattr(pretrain, "ijepa_loss", real_loss)
    lower = ("--steps", "8", "--ckpt-every", "2", "--resume", "true", "--lr", "5e-4")
    with pytest.raises(ValueError, match=r"lr: 0\.001 -> 0\.0005.*--allow-changes"):
        train(tiny(tmp_path / "run", *lower))
    with pytest.raises(ValueError, match="only schedule settings"):
        train(tiny(tmp_path / "run", *lower, "--allow-changes", "lr,patch_size"))
    train(tiny(tmp_path / "run", *lower, "--allow-changes", "lr"))
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [int(r["step"]) for r in rows][-1] == 8 and all(math.isfinite(float(r["loss"])) for r in rows)


def test_target_spread_tells_a_collapsed_encoder_from_a_healthy_one():
    images = torch.randn(4, 3, 8, 8)
    varied = lambda x: torch.randn(x.size(0), 16, 32, generator=torch.Generator().manual_seed(0))  # noqa: E731
    collapsed = lambda x: torch.randn(32).expand(x.size(0), 16, 32) + 1e-4 * varied(x)  # noqa: E731
    assert target_spread(TargetFeatures(varied), images).item() == pytest.approx(1.0, abs=0.1)
    assert target_spread(TargetFeatures(collapsed), images).item() < 0.01
    # every patch of an image alike, images different: the paper's target still varies, an instance-normed one not
    per_image = lambda x: torch.randn(x.size(0), 1, 32).expand(-1, 16, -1)  # noqa: E731
    assert target_spread(TargetFeatures(per_image), images).item() > 0.5
    assert target_spread(TargetFeatures(per_image, "instance"), images).item() < 0.1


def fused_only_in_the_target_pass(model) -> bool:
    """Whether exactly the target encoder's blocks run fused SDPA (what CPU bf16 training picks)."""
    fused = {name: m.fused_attn for name, m in model.named_modules() if hasattr(m, "fused_attn")}
    return bool(fused) and all(on == name.startswith("target_encoder.") for name, on in fused.items())


def test_cpu_bf16_training_runs_the_target_pass_fused_with_the_same_targets():
    """Plain attention where a backward runs (faster on CPU bf16), fused SDPA in the target pass, whose targets
    must not change by it."""
    model = IJepa(IJepaConfig.from_arch("vit_tiny", img_size=32, patch_size=4, depth=2, predictor_depth=1)).eval()
    pretrain.set_training_attention(model, torch.device("cpu"), "bf16")
    assert fused_only_in_the_target_pass(model)
    images = model.normalize(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        targets_fused = TargetFeatures(model.target_encoder)(images)
        set_fused_attention(model.target_encoder, False)
        targets_plain = TargetFeatures(model.target_encoder)(images)
    torch.testing.assert_close(targets_fused, targets_plain, atol=1e-5, rtol=1e-5)


def test_a_run_trains_on_the_fast_kernels_and_an_older_checkpoint_resumes_onto_them(tmp_path):
    """What train() builds on a CPU in bf16: fused attention only in the target pass, fused AdamW, and the fused
    kernel again after resuming a checkpoint whose optimizer was saved with the foreach loop (runs before
    2026-12-07), which load_state_dict alone would bring back."""
    model = train(tiny(tmp_path / "run", "--steps", "2", "--ckpt-every", "1", "--precision", "bf16"))
    assert fused_only_in_the_target_pass(model)
    checkpoints = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert all(g["fused"] for g in load_checkpoint(checkpoints[-1])["optimizer"]["param_groups"])
    older = load_checkpoint(checkpoints[0])
    for group in older["optimizer"]["param_groups"]:
        group.update(fused=None, foreach=True)
    torch.save(older, checkpoints[0])
    checkpoints[-1].unlink()
    train(tiny(tmp_path / "run", "--steps", "2", "--ckpt-every", "1", "--precision", "bf16", "--resume", "true"))
    groups = load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])["optimizer"]["param_groups"]
    assert [(g["fused"], g["foreach"]) for g in groups] == [(True, None)] * 2


def test_collapse_is_logged_with_a_warning(tmp_path, monkeypatch, caplog):
    train(tiny(tmp_path / "ok", "--steps", "3"))
    rows = list(csv.DictReader(open(tmp_path / "ok" / "log.csv")))
    assert len(rows) == 3 and all(float(r["target_std"]) > pretrain.COLLAPSED_SPREAD for r in rows)
    assert "collapsed" not in caplog.text
    monkeypatch.setattr(pretrain, "target_spread", lambda target_pass, images: torch.tensor(0.01))
    with caplog.at_level("WARNING", logger="train.pretrain"):
        train(tiny(tmp_path / "collapsed", "--steps", "3"))
    assert caplog.text.count("collapsed") == 1  # once, not at every logging step


def _step_weights(run, step: int, part: str) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run / "checkpoints" / f"ckpt-{step:08d}.pt")["model"]
    return {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}


@pytest.mark.parametrize("momentum", [1.0, 0.0])
def test_training_moves_the_target_encoder_only_by_its_ema(tmp_path, momentum):
    """Momentum 1: the target never moves while the encoder does. Momentum 0: after each step the target IS the
    encoder just updated (so the EMA follows the optimizer step, not the step before)."""
    run = tmp_path / "run"
    train(tiny(run, "--steps", "2", "--ckpt-every", "1", "--keep-last", "5", "--ema-start", str(momentum),
               "--ema-end", str(momentum)))
    encoder = [_step_weights(run, s, "encoder") for s in (1, 2)]
    target = [_step_weights(run, s, "target_encoder") for s in (1, 2)]
    predictor = [_step_weights(run, s, "predictor") for s in (1, 2)]
    assert any(not torch.equal(encoder[0][k], encoder[1][k]) for k in encoder[0])  # the encoder trained
    unchanged = [k for k in predictor[0] if torch.equal(predictor[0][k], predictor[1][k])]
    assert unchanged == ["predictor_pos_embed"]  # the predictor trained: all but its fixed sin-cos positions
    for k in target[0]:
        if momentum == 1.0:
            assert torch.equal(target[0][k], target[1][k]), k
        else:
            torch.testing.assert_close(target[1][k], encoder[1][k], rtol=0, atol=1e-7, msg=k)


def test_schedules_run_from_their_start_to_their_final_values(tmp_path):
    """lr warms up from --start-lr to --lr and decays towards --final-lr; weight decay rises from --weight-decay to
    --final-weight-decay; the EMA momentum rises from --ema-start to --ema-end. The log says so, and the optimizer
    really used the logged values (its saved state at the last step)."""
    run = tmp_path / "run"
    cfg = tiny(run, "--steps", "6", "--warmup-steps", "2", "--start-lr", "1e-4", "--lr", "1e-3", "--final-lr", "1e-5",
               "--weight-decay", "0.05", "--final-weight-decay", "0.3", "--ema-start", "0.9", "--ema-end", "0.99")
    train(cfg)
    with open(run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]  # row n: the values step n trained with (from 0)
    lrs, wds, emas = ([float(r[key]) for r in rows] for key in ("lr", "weight_decay", "ema"))
    assert lrs[0] == pytest.approx(1e-4) and lrs[2] == pytest.approx(1e-3) and lrs[1] < lrs[2]  # warmup to peak
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 1e-5  # cosine decay towards --final-lr, reached after the last step
    assert wds[0] == pytest.approx(0.05) and all(a < b for a, b in zip(wds, wds[1:])) and wds[-1] < 0.3
    assert emas[0] == pytest.approx(0.9) and all(a < b for a, b in zip(emas, emas[1:])) and emas[-1] < 0.99
    groups = load_checkpoint(run / "checkpoints" / "ckpt-00000006.pt")["optimizer"]["param_groups"]
    assert all(g["lr"] == pytest.approx(lrs[-1], rel=1e-4) for g in groups)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, pytest.approx(wds[-1], rel=1e-4)]


@pytest.mark.slow
def test_two_gloo_ranks_stay_identical_and_learn(tmp_path):
    rank0, rank1 = train_on_two_gloo_ranks(f"""
        from train.config import parse_config
        from train.pretrain import PretrainConfig, train
        cfg = parse_config(PretrainConfig, {TINY!r} + ["--out-dir", {str(tmp_path / 'ddp')!r}, "--steps", "30",
                           "--lr", "0.002", "--warmup-steps", "5", "--log-every", "5", "--device", "cpu"])
    """, tmp_path / "ddp")
    torch.testing.assert_close(rank0, rank1, rtol=0, atol=0)
    curve = losses(tmp_path / "ddp")
    assert curve[-1] < 0.8 * curve[0], curve


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_and_keeps_the_last_good_checkpoint(tmp_path):
    """Each rank checks its loss at its own logging step: were the check not collective, the rank that saw no NaN
    would wait forever in the next all-reduce. Rank 1's loss turns NaN at step 3; both ranks must stop at step 4
    (the window's end) with the message, before the step-4 checkpoint is written."""
    script = tmp_path / "nan_on_rank1.py"
    script.write_text(textwrap.dedent(f"""
        import os
        import train.pretrain as pretrain
        from train.config import parse_config
        calls = {{"n": 0}}
        loss_of = pretrain.ijepa_loss
        def nan_on_rank1(*args, **kwargs):
            calls["n"] += 1
            loss = loss_of(*args, **kwargs)
            # a NaN value with finite gradients: rank 0's weights and losses stay finite, only rank 1 sees it
            return loss + float("nan") if os.environ["RANK"] == "1" and calls["n"] >= 3 else loss
        pretrain.ijepa_loss = nan_on_rank1
        pretrain.train(parse_config(pretrain.PretrainConfig, {TINY!r} + [
            "--out-dir", {str(tmp_path / 'run')!r}, "--steps", "10", "--log-every", "4", "--ckpt-every", "2",
            "--device", "cpu"]))
    """))
    result = run_on_two_gloo_ranks(script, timeout=300)
    assert result.returncode != 0
    assert "loss or weights became NaN/inf by step 4" in result.stderr, result.stderr[-3000:]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("ckpt-*.pt")] == ["ckpt-00000002.pt"]


def test_every_config_the_docs_mention_exists_and_parses():
    texts = [(REPO / "README.md").read_text()] + [p.read_text() for p in (REPO / "train").glob("*.py")]
    mentioned = {m for text in texts for m in re.findall(r"train/configs/[\w.]+\.yaml", text)}
    assert "train/configs/emoji_cpu.yaml" in mentioned
    for path in sorted(mentioned):
        assert (REPO / path).is_file(), f"documented but missing: {path}"
    for path in (REPO / "train" / "configs").glob("*.yaml"):
        if path.name.startswith("sweep_"):  # variant lists for train.sweep, not pretraining configs
            continue
        cfg = parse_config(PretrainConfig, ["--config", str(path)])
        assert cfg.img_size % cfg.patch_size == 0, path.name


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_uses_bf16_only_where_the_cpu_has_it(monkeypatch, native, expected):
    # a CPU without AVX512-BF16 or AMX emulates bf16: a bf16 step there ran many times slower than fp32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision(torch.device("cpu"), "auto") == expected
    assert resolve_precision(torch.device("cpu"), "fp32") == "fp32"


def test_asking_for_emulated_bf16_warns_but_is_honoured(monkeypatch, caplog):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert resolve_precision(torch.device("cpu"), "bf16") == "bf16"
    assert "no native bf16" in caplog.text
    with pytest.raises(ValueError, match="precision must be auto, bf16 or fp32"):
        resolve_precision(torch.device("cpu"), "fp16")


def test_data2vec_targets_are_what_the_exported_model_calls_truth(tmp_path):
    """A run with instance-normed, 2-block targets learns, and its exported model computes 'truth' (what the app
    and the probes compare predictions with) the way the loss did; the paper's target stays the default."""
    train(tiny(tmp_path / "run", "--steps", "8", "--depth", "2", "--target-norm", "instance", "--target-layers", "2"))
    assert losses(tmp_path / "run")[-1] < losses(tmp_path / "run")[0]
    loaded = load_model(tmp_path / "run" / "model")
    assert (loaded.config.target_norm, loaded.config.target_layers) == ("instance", 2)
    images = torch.rand(2, 3, 32, 32)
    blocks = loaded.target_encoder.block_outputs(loaded.normalize(images), last=2)
    centred = [(b - b.mean(1, keepdim=True)) / (b.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt() for b in blocks]
    expected = torch.nn.functional.layer_norm((centred[0] + centred[1]) / 2, (loaded.config.embed_dim,))
    torch.testing.assert_close(true_features(loaded, images), expected, atol=1e-4, rtol=1e-4)
    paper = load_model(tmp_path / "run" / "model")
    paper.config.target_norm, paper.config.target_layers = "layer", 1
    torch.testing.assert_close(true_features(paper, images), torch.nn.functional.layer_norm(
        paper.target_encoder(paper.normalize(images)), (paper.config.embed_dim,)))
    with pytest.raises(ValueError, match="needs target_norm 'instance'"):
        train(tiny(tmp_path / "bad", "--steps", "1", "--depth", "2", "--target-layers", "2"))


@pytest.mark.slow
def test_compiled_run_trains_like_an_eager_one_and_compiles_the_target_pass(tmp_path, monkeypatch):
    """--compile true changes speed, not the run: same losses and weights as eager, with data2vec targets too,
    whose target pass (block_outputs, not the encoder's forward) is compiled with the rest."""
    compiled, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or real_compile(module, **kw))
    args = ("--steps", "4", "--depth", "2", "--target-norm", "instance", "--target-layers", "2")
    eager = train(tiny(tmp_path / "eager", *args))
    assert compiled == []
    fast = train(tiny(tmp_path / "compiled", *args, "--compile", "true"))
    assert [type(m).__name__ for m in compiled] == ["VisionTransformer", "VisionTransformerPredictor",
                                                     "TargetFeatures"]
    assert isinstance(compiled[-1], TargetFeatures) and compiled[-1].layers == 2
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)
    for (name, a), b in zip(eager.state_dict().items(), fast.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=name)


def test_held_out_knn_during_training_is_what_eval_reports_and_changes_no_step(tmp_path):
    """--knn-every logs the emoji protocol's kNN as the run goes (the semantics a loss curve hides): its last row is
    the figure train.eval gives the exported model, and a monitored run trains exactly like an unmonitored one."""
    plain = train(tiny(tmp_path / "plain", "--steps", "4"))
    monitored = train(tiny(tmp_path / "monitored", "--steps", "4", "--knn-every", "3"))
    assert losses(tmp_path / "monitored") == losses(tmp_path / "plain")
    for a, b in zip(plain.state_dict().values(), monitored.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with open(tmp_path / "monitored" / "knn.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), int(r["images_seen"])) for r in rows] == [(3, 24), (4, 32)]  # every 3 steps and the end
    assert (tmp_path / "monitored" / "knn.png").stat().st_size > 0
    protocol = evaluate_emoji_features(load_model(tmp_path / "monitored" / "model"), sources=("target_encoder",))
    # The same fp32 features through the same fused attention (a training run's target encoder runs fused too):
    # allow a vote or two to flip among the 640 queries (0.16 points each) for rounding.
    for key, figure in (("knn_group", protocol["features"]["target_encoder"]["knn_group"]),
                        ("object_knn_group", protocol["object_patches_only"]["target_encoder"]["knn_group"])):
        assert abs(float(rows[-1][key]) - figure) <= 0.35, key


def test_the_imagenet_config_starts_from_the_official_training_init():
    """The official training script redraws every Linear after the model constructors, so residual projections
    start unscaled; in1k_vith14.yaml asks for that, the emoji recipes keep the constructors' depth scaling."""
    official = parse_config(PretrainConfig, ["--config", "train/configs/in1k_vith14.yaml"])
    assert official.rescale_residual_init is False and official.official_quirks is True
    assert parse_config(PretrainConfig, ["--config", "train/configs/emoji_cpu.yaml"]).rescale_residual_init is True
    config = PretrainConfig(depth=6, img_size=32, patch_size=8, predictor_depth=2)
    torch.manual_seed(0)
    model = pretrain.IJepa(pretrain.model_config(config))
    assert model.encoder.blocks[-1].mlp.fc2.weight.detach().std() < 0.02 / 3  # 1/sqrt(2 * 6) of the init std
    torch.manual_seed(0)
    model = pretrain.IJepa(pretrain.model_config(config), rescale_residuals=official.rescale_residual_init)
    for net in (model.encoder.blocks[-1], model.predictor.predictor_blocks[-1]):
        for weight in (net.attn.proj.weight, net.mlp.fc2.weight):
            assert 0.018 < float(weight.detach().std()) < 0.022
    for ours, target in zip(model.encoder.state_dict().values(), model.target_encoder.state_dict().values()):
        assert torch.equal(ours, target)


def test_a_resumed_log_is_cut_back_whole_and_skips_a_row_a_kill_cut_short(tmp_path, monkeypatch):
    """A run killed while appending a row leaves half of one; a run killed while its log is cut back on resume
    must keep the old log (it was truncated first, losing the history and failing every later resume)."""
    header, log = "step,loss,elapsed_s", tmp_path / "log.csv"
    log.write_text(f"{header}\n1,0.5,1.0\n2,0.4,2.0\n3,0.3,3.0\n4,0.2")
    assert elapsed_by_step(log) == {1: 1.0, 2: 2.0, 3: 3.0}
    before = log.read_text()

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        start_csv_log(log, header, 2)
    assert log.read_text() == before
    monkeypatch.undo()
    start_csv_log(log, header, 3)
    assert log.read_text() == f"{header}\n1,0.5,1.0\n2,0.4,2.0\n3,0.3,3.0\n"
    log.write_text("")  # emptied by a full disk, say: the resumed run logs from its checkpoint on
    start_csv_log(log, header, 3)
    assert log.read_text() == header + "\n"


@pytest.mark.parametrize("payload", [torch.zeros(3), [1, 2], {"a": 1}, {"step": 4, "weights": {}}])
def test_a_stray_file_named_like_a_checkpoint_is_named_not_mistaken_for_one(tmp_path, payload):
    """A readable torch file that is not one of our checkpoints used to fail with a bare traceback (a KeyError, an
    AttributeError) or as a checkpoint whose settings were all 'changed'."""
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    torch.save(payload, checkpoints / "ckpt-00000004.pt")
    with pytest.raises(CheckpointError, match=r"ckpt-00000004.pt: holds .*so it is not a training checkpoint"):
        load_checkpoint(checkpoints / "ckpt-00000004.pt")
    with pytest.raises(FileExistsError, match="already holds checkpoints: pass --resume true"):
        resume_state(checkpoints, tiny(tmp_path / "run"))
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints"):
        resume_state(checkpoints, tiny(tmp_path / "run", "--resume", "true"))
    assert (checkpoints / "ckpt-00000004.pt.unreadable").is_file()  # set aside, kept


def test_unusable_data_or_masks_are_refused_before_the_run_folder_is_written(tmp_path):
    """An image folder none of whose files can be read used to fail as a DataLoader worker's traceback, and a bad
    mask setting after config.yaml was written."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.jpg").write_bytes(np.random.default_rng(i).bytes(200))
    with pytest.raises(FileNotFoundError, match=r"none of the 3 image files in .*images can be read, e\.g\. .*0\.jpg"):
        train(tiny(tmp_path / "run", "--data", str(images), "--num-workers", "2"))
    with pytest.raises(ValueError, match="num_targets"):
        train(tiny(tmp_path / "run", "--num-targets", "0"))
    assert not (tmp_path / "run").exists()
