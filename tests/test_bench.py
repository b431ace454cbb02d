"""The pretraining throughput benchmark: its analytic FLOPs agree with what a real step multiplies, and --json
prints one parseable record per measurement, with the reference measured in the same run."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import pretrain_throughput as bench
from ijepa.vision_transformer import set_fused_attention


def test_analytic_flops_match_the_matmuls_of_a_real_step():
    """The analytic count is the official step's work to the FLOP; ours leaves out exactly the context rows of the
    predictor's last block (their attention, projection and MLP; the fused qkv still runs on every row)."""
    spec = bench.ModelSpec("vit_tiny", 8, 64, 48, 2, cuda_batch=2, cpu_batch=2)  # the CPU recipe's 8 x 8 grid
    config = spec.config()
    masks = bench.pregenerate_masks(config, batch=2, count=1, seed=0, pin=False)
    variant = bench.Variant("plain fp32", "fp32", fused_attn=False)
    step, model = bench.build_step(spec, variant, torch.device("cpu"), 2, masks)
    set_fused_attention(model, False)  # the target pass too: FlopCounterMode counts plain matmuls, not CPU SDPA
    counted = {}
    for queries_only in (False, True):
        model.predictor.last_block_queries_only = queries_only
        with FlopCounterMode(display=False) as counter:
            step(0)
        counted[queries_only] = counter.get_total_flops()
    context, targets = masks[0]
    kc, kt, num_targets = context[0].size(1), targets[0].size(1), len(targets)
    dp, r = config.predictor_embed_dim, config.predictor_mlp_ratio
    analytic = 2 * bench.flops_per_image(config, kc, kt, num_targets)
    left_out = 2 * 3 * num_targets * (2 * kc * dp * dp * (1 + 2 * r) + 2 * 2 * kc * (kc + kt) * dp)
    assert counted[False] == pytest.approx(analytic, rel=1e-6)  # exact
    assert counted[True] == pytest.approx(analytic - left_out, rel=1e-6)


@pytest.mark.slow
def test_json_lines_for_ours_and_the_reference(capsys):
    rows = bench.main(["--device", "cpu", "--models", "vit_tiny", "--batch", "2", "--warmup", "1", "--steps", "1",
                       "--json"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == rows
    assert [r["variant"] for r in rows] == ["ours", "reference"]
    for row in rows:
        assert row["img_per_s"] > 0 and row["step_ms"] > 0 and 0 < row["mfu"] < 1
        assert row["gflop_per_img"] == pytest.approx(9.0, rel=0.15)  # the documented ~9 GFLOP per 64 px image
        assert 0 < row["held_mem_gib"] <= row["peak_mem_gib"] and row["graphs_compiled_while_timed"] == 0


def test_compile_time_inside_the_timed_steps_is_counted_and_said(capsys, caplog, monkeypatch):
    """Mask lengths change from step to step and each new length compiles once: without warm-up the timed steps
    include compile time, which the row and a warning must say (inductor's compile is replaced by dynamo's eager
    backend, which captures the same graphs in seconds)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager"))
    with caplog.at_level("WARNING"):
        rows = bench.main(["--device", "cpu", "--models", "vit_tiny", "--batch", "2", "--warmup", "0", "--steps",
                           "2", "--compile", "--only", "ours", "--json"])
    counts = {row["variant"]: row["graphs_compiled_while_timed"] for row in rows}
    assert counts["ours"] == 0 and counts["ours+compile"] > 0
    assert "compiled during the timed steps" in caplog.text and "raise --warmup" in caplog.text


def test_the_reference_builds_adamw_as_the_official_init_opt_does():
    """Four groups (encoder and predictor, each decayed and not): torch runs one update per group."""
    spec = bench.MODELS["vit_tiny"]
    masks = bench.pregenerate_masks(spec.config(), 2, 1, seed=0, pin=False)
    step, model = bench.build_step(spec, bench.Variant("reference", "fp32", fused_attn=False, official_step=True),
                                   torch.device("cpu"), 2, masks)
    step(0)
    groups = step.__closure__  # the optimizer lives in the closure
    optimizer = next(c.cell_contents for c in groups if isinstance(c.cell_contents, torch.optim.Optimizer))
    assert [g["weight_decay"] == 0.0 for g in optimizer.param_groups] == [False, True, False, True]
    trained = [p for part in (model.encoder, model.predictor) for p in part.parameters() if p.requires_grad]
    assert sorted(id(p) for g in optimizer.param_groups for p in g["params"]) == sorted(map(id, trained))


def test_a_failing_measurement_is_reported_and_the_others_still_run(capsys, monkeypatch):
    real = bench.measure

    def ours_fails(model_name, variant, *args, **kwargs):
        if variant.name == "ours":
            raise RuntimeError("out of memory (simulated)")
        return real(model_name, variant, *args, **kwargs)

    monkeypatch.setattr(bench, "measure", ours_fails)
    with pytest.raises(SystemExit, match="vit_tiny ours: RuntimeError: out of memory"):
        bench.main(["--device", "cpu", "--models", "vit_tiny", "--batch", "2", "--warmup", "1", "--steps", "1",
                    "--json"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["variant"], "error" in r) for r in printed] == [("ours", True), ("reference", False)]


def test_the_solver_error_is_measured_in_the_decoders_own_prediction_type():
    """The exact denoiser must be handed to the scheduler as the decoder predicts (x0 since the shipped decoders):
    given as v to an x0 decoder's scheduler, the RMS read 15.95 where make_default_scheduler states 0.018."""
    from bench import decoder_sampling
    from decoder import SketchDecoder

    rows = {kind: {(r["spacing"], r["steps"]): r["rms"] for r in decoder_sampling.solver_error_rows(
        SketchDecoder(prediction_type=kind), [10])} for kind in ("sample", "v_prediction")}
    assert rows["sample"] == pytest.approx(rows["v_prediction"], abs=1e-3)
    assert rows["sample"][("uniform_log_snr", 10)] < 0.03 < rows["sample"][("uniform_t", 10)] < 0.15


def test_app_latency_says_when_the_bundles_default_decoder_is_damaged_and_names_the_one_it_timed(tmp_path, capsys):
    """With decoder/ damaged the app falls back to decoder_paper, and so does the benchmark: its figures are then the
    other decoder's, which it must say rather than report them as the default's."""
    from bench import app_latency
    from ijepa.bundle import build_random_bundle
    from ijepa.model import IJepaConfig
    config = IJepaConfig.from_arch("vit_tiny", **app_latency.DEFAULT_ARCH)
    bundle = build_random_bundle(tmp_path / "assets", config, decoder_kwargs={}, num_examples=0)
    weights = bundle / "decoder" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    row = app_latency.main(["--assets", str(bundle), "--samples", "1", "--steps", "1", "--repeats", "1",
                            "--warmup", "0", "--json"])
    err = capsys.readouterr().err
    assert row["decoder"] == "pooled" and "note: The sketch decoder in" in err and "could not be loaded" in err


def test_app_latency_times_the_wait_for_a_stop_both_ways(tmp_path):
    """--stop-after runs the app's stop (between sampler steps) and the old one (between updates) in the same
    repeats; the figures in bench/RESULTS.md come from it."""
    from bench import app_latency
    from ijepa.bundle import build_random_bundle
    from ijepa.model import IJepaConfig
    config = IJepaConfig.from_arch("vit_tiny", **app_latency.DEFAULT_ARCH)
    bundle = build_random_bundle(tmp_path / "assets", config, decoder_kwargs={}, num_examples=0)
    row = app_latency.main(["--assets", str(bundle), "--samples", "2", "--steps", "50", "--repeats", "1",
                            "--warmup", "0", "--stop-after", "0", "--json"])
    assert row["stop_after_s"] == 0
    for key in ("stop_wait_p50_s", "stop_wait_max_s", "stop_wait_between_updates_p50_s",
                "stop_wait_between_updates_max_s"):
        assert 0 <= row[key] < 60, key
