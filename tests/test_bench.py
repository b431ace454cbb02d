"""The pretraining throughput benchmark: its analytic FLOPs agree with what a real step multiplies, and --json
prints one parseable record per measurement, with the reference measured in the same run."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import pretrain_throughput as bench
from ijepa.vision_transformer import set_fused_attention


def test_analytic_flops_match_the_matmuls_of_a_real_step():
    spec = bench.ModelSpec("vit_tiny", 8, 64, 48, 2, cuda_batch=2, cpu_batch=2)  # the CPU recipe's 8 x 8 grid
    config = spec.config()
    masks = bench.pregenerate_masks(config, batch=2, count=1, seed=0, pin=False)
    variant = bench.Variant("plain fp32", "fp32", fused_attn=False)
    step, model = bench.build_step(spec, variant, torch.device("cpu"), 2, masks)
    set_fused_attention(model, False)  # the target pass too: FlopCounterMode counts plain matmuls, not CPU SDPA
    with FlopCounterMode(display=False) as counter:
        step(0)
    context, targets = masks[0]
    analytic = 2 * bench.flops_per_image(config, context[0].size(1), targets[0].size(1), len(targets))
    assert counter.get_total_flops() == pytest.approx(analytic, rel=1e-6)  # exact


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
