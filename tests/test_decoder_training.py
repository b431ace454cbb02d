"""Decoder training and its evaluation on a tiny frozen I-JEPA: export, exact resume, metrics."""
import csv
import logging
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import train_on_two_gloo_ranks
import train.decoder as decoder_training
import train.eval_decoder as eval_decoder
from decoder import SketchDecoder, largest_user_box
from ijepa.bundle import load_decoder
from ijepa.checkpoint import load_model, save_model
from ijepa.model import IJepa, IJepaConfig
from train.config import parse_config
from train.decoder import OFFICIAL_TARGETS, DecoderTrainConfig, sample_boxes, sample_box_shape



@pytest.fixture(scope="module")
def tiny_ijepa(tmp_path_factory):
    torch.manual_seed(0)
    model = IJepa(IJepaConfig.from_arch("vit_tiny", img_size=32, patch_size=8, depth=1, predictor_depth=1,
                                        predictor_embed_dim=48))
    return save_model(model, tmp_path_factory.mktemp("ijepa") / "model")


def tiny_cfg(checkpoint, out_dir, *extra) -> DecoderTrainConfig:
    return parse_config(DecoderTrainConfig, [
        "--checkpoint", str(checkpoint), "--out-dir", str(out_dir), "--block-out-channels", "32,32,32",
        "--feature-channels", "4", "--batch-size", "4", "--num-workers", "0", "--log-every", "1",
        "--sample-every", "100", "--precision", "fp32", "--warmup-steps", "1", *extra])


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "-1", "lr must be positive"),
    ("--true-fraction", "2", "true_fraction must be between 0 and 1"),
    ("--target-like-fraction", "-1", "target_like_fraction must be between 0 and 1"),
    ("--feature-channels", "0", "feature_channels must be positive"),
    ("--layers-per-block", "0", "layers_per_block must be positive"),
    ("--block-out-channels", "32,0,32", "block_out_channels must be positive"),
])
def test_impossible_decoder_settings_are_refused_before_anything_runs(tmp_path, flag, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_cfg(tmp_path / "model", tmp_path / "run", flag, value)


def test_a_model_trained_at_a_size_the_unet_cannot_halve_is_refused_before_anything_is_written(tmp_path):
    """A 42 px model (7 x 7 patches of 6 px) trained fine, and its decoder run then crashed in diffusers at the
    first step ("Expected size 22 but got size 21"), leaving config.yaml and log.csv behind."""
    model = IJepa(IJepaConfig.from_arch("vit_tiny", img_size=42, patch_size=6, depth=1, predictor_depth=1,
                                        predictor_embed_dim=48))
    checkpoint = save_model(model, tmp_path / "model")
    with pytest.raises(ValueError, match="image_size 42 must be a multiple of 4: the UNet.s 3 levels halve it 2 times"):
        decoder_training.train(tiny_cfg(checkpoint, tmp_path / "run", "--steps", "1"))
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "log.csv").exists()


def test_an_emoji_decoder_for_a_model_that_did_not_learn_emoji_says_so(tmp_path, tiny_ijepa, caplog):
    """Without --data the decoder learns emoji scenes, which for a model trained on a folder (or the official
    weights) draws the wrong world: said, as the app's hint says --data."""
    with caplog.at_level(logging.WARNING, logger="train.decoder"):
        decoder_training.train(tiny_cfg(tiny_ijepa, tmp_path / "run", "--steps", "1", "--ckpt-every", "1"))
    assert "does not say it learnt the emoji world" in caplog.text and "pass --data" in caplog.text


def test_box_sampling_covers_target_like_and_user_like_boxes():
    rng = np.random.default_rng(0)
    shapes = {sample_box_shape((16, 16), rng, 0.5) for _ in range(400)}
    assert (1, 1) in shapes  # a single patch
    assert any(r * c >= 40 for r, c in shapes) and any(r != c for r, c in shapes)
    assert max(max(s) for s in shapes) <= 8  # half the image at most (a 0.2-scale, 1.5-aspect target, 9, is cut)
    targets, contexts = sample_boxes(5, (8, 8), rng, 0.5)
    assert targets.shape[0] == contexts.shape[0] == 5 and targets.shape[1] + contexts.shape[1] == 64
    for t, c in zip(targets, contexts):
        assert not set(t.tolist()) & set(c.tolist())


@pytest.mark.parametrize("grid", [(8, 8), (14, 14), (16, 16)])
def test_no_trained_box_exceeds_the_largest_box_the_app_calls_learnt(grid):
    """The app flags boxes beyond largest_user_box as outside the decoder's training, so training draws none: a
    tall target block (9x6 on 16x16, 8x5 on 14x14) is cut to it. On the shipped 8x8 grid no target block exceeded
    it, so the shipped decoders' box distribution is unchanged."""
    rows, cols = largest_user_box(grid)
    rng = np.random.default_rng(0)
    shapes = {sample_box_shape(grid, rng, fraction) for fraction in (1.0, 0.5) for _ in range(5000)}
    assert max(r for r, _ in shapes) == rows and max(c for _, c in shapes) == cols
    if grid == (8, 8):
        largest_area = OFFICIAL_TARGETS.target_scale[1] * 64
        flattest, tallest = OFFICIAL_TARGETS.target_aspect  # rows / cols
        assert round(math.sqrt(largest_area * tallest)) <= rows and round(math.sqrt(largest_area / flattest)) <= cols


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the device machine)")
def test_a_decoder_trains_and_draws_its_sample_grid_on_a_gpu(tmp_path, tiny_ijepa):
    """The sample grid (every --sample-every steps and at the end) once built CPU tensors beside CUDA ones, which
    would have stopped the GPU recipe in its first minute."""
    decoder_training.train(tiny_cfg(tiny_ijepa, tmp_path / "gpu", "--steps", "2", "--sample-every", "1",
                                    "--device", "cuda", "--precision", "bf16"))
    assert [p.name for p in sorted((tmp_path / "gpu" / "samples").glob("*.png"))] == ["step-0000001.png",
                                                                                      "step-0000002.png"]


def test_killed_decoder_run_resumes_exactly_and_exports(tmp_path, tiny_ijepa, monkeypatch):
    full = decoder_training.train(tiny_cfg(tiny_ijepa, tmp_path / "full", "--steps", "4", "--ckpt-every", "2"))
    real, calls = decoder_training.box_conditions, {"n": 0}

    def dies_at_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(decoder_training, "box_conditions", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        decoder_training.train(tiny_cfg(tiny_ijepa, tmp_path / "cut", "--steps", "4", "--ckpt-every", "2"))
    monkeypatch.setattr(decoder_training, "box_conditions", real)
    resumed = decoder_training.train(tiny_cfg(tiny_ijepa, tmp_path / "cut", "--steps", "4", "--ckpt-every", "2",
                                              "--resume", "true"))

    def losses(run):
        with open(tmp_path / run / "log.csv") as f:
            return [float(r["loss"]) for r in csv.DictReader(f)]

    assert losses("cut") == losses("full")
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    exported = SketchDecoder.from_pretrained(tmp_path / "full" / "decoder")
    assert exported.config.grid_size in ([4, 4], (4, 4)) and exported.config.feature_dim == 192
    model = load_model(tiny_ijepa)  # the decoder names the model it learnt, so the app can check it is used with it
    assert list(exported.config.model_signature) == model.feature_signature()
    assert load_decoder(tmp_path / "full" / "decoder", model).config.model_signature
    assert (tmp_path / "full" / "samples" / "step-0000004.png").is_file()


def test_a_decoder_run_does_not_resume_onto_other_weights_at_its_model_path(tmp_path, tiny_ijepa):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_ijepa, model_dir)
    decoder_training.train(tiny_cfg(model_dir, tmp_path / "run", "--steps", "2", "--ckpt-every", "1"))
    shutil.rmtree(model_dir)  # the folder exported again, from another run: same shapes, other weights
    torch.manual_seed(1)
    save_model(IJepa(load_model(tiny_ijepa).config), model_dir)
    more = ("--steps", "3", "--ckpt-every", "1", "--resume", "true", "--allow-changes", "steps")
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ValueError, match="no longer the model this decoder was trained on"):
        decoder_training.train(tiny_cfg(model_dir, tmp_path / "run", *more))
    assert (tmp_path / "run" / "config.yaml").read_text() == recorded  # "nothing was overwritten" holds
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["ckpt-00000001.pt",
                                                                                    "ckpt-00000002.pt"]
    shutil.rmtree(model_dir)
    shutil.copytree(tiny_ijepa, model_dir)  # the model it was trained on: the run goes on
    decoder_training.train(tiny_cfg(model_dir, tmp_path / "run", *more))
    assert (tmp_path / "run" / "decoder" / "config.json").is_file()


def test_a_run_folder_of_the_other_training_script_is_named_as_such(tmp_path, tiny_ijepa):
    """train.decoder pointed at a pretraining run said 'pass --resume true', then 'its settings differ' listing
    decoder defaults as the 'original settings' (review); and the same the other way round."""
    from train.runtime import resume_state, save_checkpoint

    pretraining = tmp_path / "pretrain_run"
    save_checkpoint({"model": {"w": torch.zeros(1)}, "optimizer": {}, "step": 1, "config": {"lr": 1e-3}},
                    pretraining / "checkpoints", 1, 2)
    for resume in ("false", "true"):
        with pytest.raises(ValueError, match="pretrain_run is a pretraining .* run folder, not one of sketch decoder"):
            decoder_training.train(tiny_cfg(tiny_ijepa, pretraining, "--steps", "1", "--resume", resume))
    assert not (pretraining / "config.yaml").exists()
    decoder_run = tmp_path / "decoder_run"
    decoder_training.train(tiny_cfg(tiny_ijepa, decoder_run, "--steps", "1"))
    with pytest.raises(ValueError, match="decoder_run is a sketch decoder .* run folder, not one of pretraining"):
        resume_state(decoder_run / "checkpoints", tiny_cfg(tiny_ijepa, decoder_run), holds="model")


def test_a_nan_between_log_steps_stops_the_decoder_before_it_is_checkpointed(tmp_path, tiny_ijepa, monkeypatch):
    real, calls = decoder_training.DecoderLoss.forward, {"n": 0}

    def nan_from_step_5(self, *args, **kwargs):
        calls["n"] += 1
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] >= 5 else loss

    monkeypatch.setattr(decoder_training.DecoderLoss, "forward", nan_from_step_5)
    # logs every 4 steps, checkpoints every 3: the NaN of step 5 must not reach the step-6 checkpoint
    with pytest.raises(FloatingPointError, match="ckpt-00000003.pt"):
        decoder_training.train(tiny_cfg(tiny_ijepa, tmp_path / "run", "--steps", "8", "--ckpt-every", "3",
                                        "--log-every", "4"))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("ckpt-*.pt")] == ["ckpt-00000003.pt"]


def test_a_finite_loss_with_nan_gradients_stops_the_decoder_before_it_is_checkpointed(tmp_path, tiny_ijepa,
                                                                                       monkeypatch):
    real, calls = decoder_training.DecoderLoss.forward, {"n": 0}

    def nan_gradient_at_step_2(self, *args, **kwargs):
        calls["n"] += 1
        loss = real(self, *args, **kwargs)
        return loss + torch.sqrt(loss * 0) if calls["n"] == 2 else loss  # finite value, NaN gradient

    monkeypatch.setattr(decoder_training.DecoderLoss, "forward", nan_gradient_at_step_2)
    with pytest.raises(FloatingPointError, match="weights became NaN/inf by step 3"):
        decoder_training.train(tiny_cfg(tiny_ijepa, tmp_path / "run", "--steps", "6", "--ckpt-every", "3",
                                        "--log-every", "3"))
    assert not list((tmp_path / "run" / "checkpoints").glob("ckpt-*.pt"))


def test_decoder_eval_reports_both_modes_and_exact_context(tmp_path, tiny_ijepa, monkeypatch):
    for mode in ("spatial_context", "pooled"):
        decoder_training.train(tiny_cfg(tiny_ijepa, tmp_path / mode, "--steps", "1", "--conditioning", mode))
    report = eval_decoder.main(["--checkpoint", str(tiny_ijepa), "--decoder", str(tmp_path / "spatial_context" /
                                "decoder"), "--paper-decoder", str(tmp_path / "pooled" / "decoder"),
                                "--num-images", "64", "--num-samples", "2", "--num-steps", "2",
                                "--out-dir", str(tmp_path / "eval"), "--device", "cpu"])
    assert set(report["decoders"]) == {"ours (spatial + context)", "paper (pooled only)"}
    for metrics in report["decoders"].values():
        assert metrics["gallery"] >= 64
        assert metrics["max_context_change_8bit"] == 0
        assert 0 <= metrics["retrieval_top1"] <= 100 and metrics["diversity_rms"] > 0
        assert 0 <= metrics["grey_box_top1"] <= 100 and metrics["chance_top1"] == 100 / metrics["gallery"]
    floors = {m["grey_box_top1"] for m in report["decoders"].values()}
    assert len(floors) == 1  # decoder-independent: the same images, boxes and conditions for both
    assert (tmp_path / "eval" / "samples.png").is_file() and (tmp_path / "eval" / "results.json").is_file()
    with pytest.raises(SystemExit):  # one sketch per box has no diversity to measure
        eval_decoder.main(["--checkpoint", str(tiny_ijepa), "--decoder", "unused", "--num-samples", "1"])
    with pytest.raises(SystemExit):  # numpy takes no negative seed: refused before the models load
        eval_decoder.main(["--checkpoint", str(tiny_ijepa), "--decoder", "unused", "--seed", "-1"])
    # the two decoders given the other way round: refused, not reported under each other's names
    swapped = ["--checkpoint", str(tiny_ijepa), "--decoder", str(tmp_path / "pooled" / "decoder"),
               "--paper-decoder", str(tmp_path / "spatial_context" / "decoder"), "--out-dir", str(tmp_path / "e2")]
    with pytest.raises(ValueError, match="is a pooled decoder, but --decoder takes ours: pass it as --paper-decoder"):
        eval_decoder.main(swapped)
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(eval_decoder, "evaluate_decoder", lambda *a, **k: pytest.fail("scored"))
    # a mistyped second decoder is refused before the first is scored (that took minutes), with the real checkpoint
    typo = ["--checkpoint", str(tiny_ijepa), "--decoder", str(tmp_path / "spatial_context" / "decoder"),
            "--paper-decoder", str(tmp_path / "poooled"), "--out-dir", str(tmp_path / "e5")]
    with pytest.raises(FileNotFoundError, match=rf"poooled is not a sketch decoder folder.*--checkpoint {tiny_ijepa}"):
        eval_decoder.main(typo)
    few = tmp_path / "few"  # read round again, 5 files made a 64-image gallery of repeated (image, box) pairs
    few.mkdir()
    for i in range(5):
        Image.new("RGB", (40, 40), (50 * i, 20, 200)).save(few / f"{i}.png")
    with pytest.raises(ValueError, match="holds 5 images and --num-images 64 needs 64 distinct ones: scoring needs "
                                         "at least 64: pass a larger folder"):  # not a --num-images it refuses
        eval_decoder.main(["--checkpoint", str(tiny_ijepa), "--decoder", str(tmp_path / "spatial_context" /
                                                                             "decoder"), "--data", str(few),
                           "--num-images", "64", "--out-dir", str(tmp_path / "e3")])
    with pytest.raises(ValueError, match="pass 'emoji' or the path of an existing image folder"):
        eval_decoder.main(["--checkpoint", str(tiny_ijepa), "--decoder", str(tmp_path / "spatial_context" /
                                                                             "decoder"),
                           "--data", str(tmp_path / "a_file"), "--out-dir", str(tmp_path / "e4")])
    assert not (tmp_path / "e4").exists()  # refused before the out-dir is made
    with pytest.raises(OSError):  # an --out-dir that is a file: refused before the minutes of scoring
        eval_decoder.main(["--checkpoint", str(tiny_ijepa), "--decoder", str(tmp_path / "spatial_context" /
                                                                             "decoder"), "--out-dir",
                           str(tmp_path / "a_file")])


def test_decoder_eval_refuses_zero_steps_before_loading_anything(tmp_path, monkeypatch):
    """--num-steps 0 was refused by the sampler only after the model and data had loaded and the out-dir was made."""
    monkeypatch.setattr(eval_decoder, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit):
        eval_decoder.main(["--checkpoint", "unused", "--decoder", "unused", "--num-steps", "0",
                           "--out-dir", str(tmp_path / "eval")])
    with pytest.raises(ValueError, match="--num-steps must be >= 1"):
        eval_decoder.evaluate_decoders("unused", "unused", None, tmp_path / "eval", num_steps=0)
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_two_gloo_ranks_train_one_decoder(tmp_path, tiny_ijepa):
    """Under torchrun the ranks see different boxes and scenes but their gradients are synchronised: the
    decoders stay bit-identical, move away from their initialisation, and rank 0 alone writes the export."""
    rank0, rank1 = train_on_two_gloo_ranks(f"""
        import torch
        from train.config import parse_config
        from train.decoder import DecoderTrainConfig, train
        cfg = parse_config(DecoderTrainConfig, [
            "--checkpoint", {str(tiny_ijepa)!r}, "--out-dir", {str(tmp_path / 'ddp')!r}, "--block-out-channels",
            "32,32,32", "--feature-channels", "4", "--batch-size", "4", "--num-workers", "0", "--log-every", "1",
            "--sample-every", "100", "--precision", "fp32", "--warmup-steps", "1", "--steps", "4",
            "--device", "cpu"])
    """, tmp_path / "ddp")
    torch.testing.assert_close(rank0, rank1, rtol=0, atol=0)
    torch.manual_seed(0)  # what train() builds before its first step
    initial_decoder = decoder_training.build_decoder(tiny_cfg(tiny_ijepa, tmp_path / "unused"), load_model(tiny_ijepa))
    initial = torch.cat([p.detach().flatten() for p in initial_decoder.parameters()])
    assert not torch.equal(initial, rank0)  # the synchronised updates did change the weights
    exported = SketchDecoder.from_pretrained(tmp_path / "ddp" / "decoder")
    torch.testing.assert_close(torch.cat([p.detach().flatten() for p in exported.parameters()]), rank0)


class _StubSampler:
    """Draws a fixed thing into each box instead of diffusing: the source image's own pixels, or flat grey. Called
    once per group, in order, as evaluate_decoder does."""

    def __init__(self, groups, fill: str):
        self.sources, self.fill = iter(g[0] for g in groups), fill

    def sample(self, cond, num_samples, num_steps, seed):
        source = next(self.sources)
        drawn = source if self.fill == "source" else torch.full_like(source, 0.5)
        return torch.where(cond.box_mask.bool(), drawn, source).repeat_interleave(num_samples, 0)


def box_groups(model, count: int, batch: int) -> list[tuple]:
    """``count`` evaluation groups of ``batch`` random 32 px images, each with one sampled box (seeded)."""
    generator, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    groups = []
    for _ in range(count):
        targets, contexts = sample_boxes(batch, model.config.grid_size, rng, target_like_fraction=0.5)
        groups.append((torch.rand(batch, 3, 32, 32, generator=generator), targets, contexts))
    return groups


def test_retrieval_finds_a_perfect_sketch_and_a_grey_box_scores_the_floor(tiny_ijepa, monkeypatch):
    """The figure behind the model card's decoder column, checked at its ends: conditioned on the true box
    features, a "sketch" that redraws the source pixels re-encodes to exactly its condition (cosine 1, found
    every time), and one that fills the box grey scores exactly the reported grey-box floor."""
    model = load_model(tiny_ijepa)
    groups = box_groups(model, 4, 16)
    monkeypatch.setattr(eval_decoder, "box_conditions", lambda m, images, targets, contexts: decoder_training.
                        box_conditions(m, images, targets, contexts, use_true=torch.ones(len(images), dtype=bool)))
    results = {}
    for fill in ("source", "grey"):
        monkeypatch.setattr(eval_decoder, "SketchSampler", lambda decoder: _StubSampler(groups, fill))
        results[fill], _ = eval_decoder.evaluate_decoder(model, None, groups, num_samples=2, num_steps=1)
    assert results["source"]["retrieval_top1"] == 100.0 and results["source"]["reencode_cosine"] > 0.9999
    assert results["source"]["diversity_rms"] == 0.0 and results["source"]["max_context_change_8bit"] == 0
    grey = results["grey"]
    assert grey["retrieval_top1"] == pytest.approx(grey["grey_box_top1"]) and grey["retrieval_top1"] < 100.0
    assert grey["reencode_cosine"] == pytest.approx(grey["grey_box_cosine"], abs=1e-6)


def record_training_steps(monkeypatch) -> list[dict]:
    """Per training step, in order: the boxes and truth/prediction choices ``box_conditions`` gets and the state of
    the noise generator the loss gets. Preview sheets are skipped (they call box_conditions too)."""
    steps, real_conditions, real_forward = [], decoder_training.box_conditions, decoder_training.DecoderLoss.forward

    def conditions(model, images, targets, contexts, use_true=None):
        steps.append({"targets": targets.clone(), "use_true": use_true.clone()})
        return real_conditions(model, images, targets, contexts, use_true)

    def forward(self, images, cond, generator):
        steps[-1]["noise_state"] = generator.get_state().clone()
        return real_forward(self, images, cond, generator)

    monkeypatch.setattr(decoder_training, "box_conditions", conditions)
    monkeypatch.setattr(decoder_training.DecoderLoss, "forward", forward)
    monkeypatch.setattr(decoder_training, "save_sample_grid", lambda *args, **kwargs: None)
    return steps


def test_true_fraction_sets_the_share_of_images_drawn_from_true_features(tmp_path, tiny_ijepa, monkeypatch):
    """--true-fraction is the share of images conditioned on the target encoder's truth (0: the predictor only)."""
    steps = record_training_steps(monkeypatch)
    decoder_training.train(tiny_cfg(tiny_ijepa, tmp_path / "quarter", "--steps", "8", "--batch-size", "8",
                                    "--true-fraction", "0.25"))
    chosen = torch.cat([s["use_true"] for s in steps])
    assert len(chosen) == 64 and 0.1 <= chosen.float().mean().item() <= 0.4
    steps.clear()
    decoder_training.train(tiny_cfg(tiny_ijepa, tmp_path / "none", "--steps", "2", "--true-fraction", "0"))
    assert len(steps) == 2 and not any(s["use_true"].any() for s in steps)


def test_lr_warms_up_linearly_from_its_first_step(tmp_path, tiny_ijepa):
    """The first step already trains (lr / warmup_steps, not 0) and step warmup_steps reaches --lr, as documented."""
    decoder_training.train(tiny_cfg(tiny_ijepa, tmp_path / "run", "--steps", "5", "--warmup-steps", "4",
                                    "--lr", "1e-3"))
    with open(tmp_path / "run" / "log.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert lrs == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3], rel=1e-6)


def test_exported_decoder_holds_the_ema_weights(tmp_path, tiny_ijepa):
    """decoder/ (what the app loads) is the EMA of the weights, not the last raw training weights."""
    decoder_training.train(tiny_cfg(tiny_ijepa, tmp_path / "run", "--steps", "3", "--lr", "1e-2"))
    state = torch.load(tmp_path / "run" / "checkpoints" / "ckpt-00000003.pt", weights_only=True)
    exported = SketchDecoder.from_pretrained(tmp_path / "run" / "decoder")
    assert len(list(exported.parameters())) == len(state["ema"]["shadow_params"])
    for (name, p), shadow in zip(exported.named_parameters(), state["ema"]["shadow_params"]):
        torch.testing.assert_close(p.detach(), shadow, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(p.detach(), state["decoder"][name]) for name, p in exported.named_parameters())


def test_each_step_draws_its_own_boxes_and_noise_from_its_step_number(tmp_path, tiny_ijepa, monkeypatch):
    """Steps see fresh boxes and noise, and a resumed run draws exactly the uninterrupted run's for the same step."""
    steps = record_training_steps(monkeypatch)
    decoder_training.train(tiny_cfg(tiny_ijepa, tmp_path / "full", "--steps", "3"))
    full = list(steps)
    steps.clear()
    decoder_training.train(tiny_cfg(tiny_ijepa, tmp_path / "cut", "--steps", "2"))
    decoder_training.train(tiny_cfg(tiny_ijepa, tmp_path / "cut", "--steps", "3", "--resume", "true",
                                    "--allow-changes", "steps"))
    assert len(full) == len(steps) == 3
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert not torch.equal(full[i]["targets"], full[j]["targets"]), (i, j)
        assert not torch.equal(full[i]["noise_state"], full[j]["noise_state"]), (i, j)
    for a, b in zip(full, steps):  # step 2 of the resumed run included
        assert all(torch.equal(a[key], b[key]) for key in ("targets", "use_true", "noise_state"))


class _ConstantBoxSampler:
    """Fills sample s's box with the constant levels[s] and everything outside with fresh noise per sample."""

    def __init__(self, levels):
        self.levels = torch.tensor(levels)

    def sample(self, cond, num_samples, num_steps, seed):
        b, (h, w) = cond.batch_size, cond.box_mask.shape[-2:]
        inside = cond.box_mask.bool().repeat_interleave(num_samples, 0).expand(-1, 3, -1, -1)
        levels = self.levels[:num_samples].repeat(b).view(-1, 1, 1, 1).expand(-1, 3, h, w)
        return torch.where(inside, levels, torch.rand(b * num_samples, 3, h, w))


def test_diversity_is_the_mean_pairwise_rms_distance_inside_the_box(tiny_ijepa, monkeypatch):
    """diversity_rms in results.json means the average RMS [0, 1]-pixel gap between two sketches of one box,
    untouched by what lies outside the box: levels 0, 0.25, 0.75 give pairwise 0.25, 0.75, 0.5, mean 0.5."""
    model = load_model(tiny_ijepa)
    groups = box_groups(model, 2, 4)
    monkeypatch.setattr(eval_decoder, "SketchSampler", lambda decoder: _ConstantBoxSampler([0.0, 0.25, 0.75]))
    metrics, _ = eval_decoder.evaluate_decoder(model, None, groups, num_samples=3, num_steps=1)
    assert metrics["diversity_rms"] == pytest.approx(0.5, abs=1e-6)
    metrics, _ = eval_decoder.evaluate_decoder(model, None, groups, num_samples=2, num_steps=1)
    assert metrics["diversity_rms"] == pytest.approx(0.25, abs=1e-6)


def test_decoder_eval_draws_held_out_emoji_scenes(tmp_path, tiny_ijepa, monkeypatch):
    """The decoder scores claim held-out scenes: the emoji data must be built with split="heldout", never the
    scenes the decoder trained on."""
    asked = {}

    def build_dataset(name, **kwargs):
        asked.update(kwargs, name=name)
        raise RuntimeError("stop after the dataset is chosen")

    monkeypatch.setattr(eval_decoder, "build_dataset", build_dataset)
    monkeypatch.setattr(eval_decoder, "load_checked_kind", lambda *args: torch.nn.Identity())  # loaded first now
    with pytest.raises(RuntimeError, match="stop after"):
        eval_decoder.evaluate_decoders(tiny_ijepa, "unused", None, tmp_path / "eval", data="emoji", device="cpu")
    assert asked["name"] == "emoji" and asked["split"] == "heldout"
