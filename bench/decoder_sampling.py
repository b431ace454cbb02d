"""Latency of the sketch sampler on CPU: 4 sketches of one box at 64 px, default SketchDecoder, DPM-Solver++.

Weights are random (latency does not depend on them). Reports parameters, a FLOP count per image per solver step
(torch's FlopCounterMode on one forward; it does not see the attention inside a CPU fused kernel, ~4 % of this
decoder's FLOPs, so GFLOP/s is a slight underestimate), and for each step count the wall time of ``sample`` (all
sketches) and of ``stream`` up to its first finished sketch. Median and min over --repeats runs after one
warm-up; the 1-minute load average is printed so runs on a shared machine can be judged.

    .venv/bin/python bench/decoder_sampling.py                 # fp32, 2 threads, 10/15/20 steps
    .venv/bin/python bench/decoder_sampling.py --json --bf16   # one JSON line per measurement, plus bf16 autocast
    .venv/bin/python bench/decoder_sampling.py --solver-error  # step-spacing check with an exact denoiser

--solver-error backs the sampler's choice of steps uniform in log-SNR: data are image-like Gaussians (1/f^2
spectrum, 3x64x64, pixel std 0.5), for which the ideal v-prediction is known in closed form, so the RMS distance
between an n-step solve and a 500-step solve from the same noise is the solver's discretisation error alone.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusers import DPMSolverMultistepScheduler  # noqa: E402

from decoder import SketchCondition, SketchDecoder, SketchSampler, make_default_scheduler  # noqa: E402


def box_condition(decoder: SketchDecoder, box_patches: int) -> SketchCondition:
    """One random image and a centred square box of box_patches x box_patches patches, layer-normed tokens."""
    gh, gw = decoder.config.grid_size
    top, left = (gh - box_patches) // 2, (gw - box_patches) // 2
    indices = torch.tensor(
        [[r * gw + c for r in range(top, top + box_patches) for c in range(left, left + box_patches)]]
    )
    generator = torch.Generator().manual_seed(0)
    size = decoder.config.image_size
    image = torch.rand(1, 3, size, size, generator=generator) * 2 - 1
    tokens = torch.randn(1, indices.size(1), decoder.config.feature_dim, generator=generator)
    tokens = F.layer_norm(tokens, (decoder.config.feature_dim,))
    return SketchCondition.from_image(image, tokens, indices, (gh, gw))


def flops_per_image_step(decoder: SketchDecoder, cond: SketchCondition) -> float:
    size = decoder.config.image_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        decoder(torch.zeros(1, 3, size, size), 500, cond)
    return counter.get_total_flops()


def time_runs(fn, repeats: int) -> list[float]:
    fn()  # warm-up: oneDNN primitive creation, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def forward_times(decoder: SketchDecoder, cond: SketchCondition, batch: int, repeats: int) -> list[float]:
    """Wall time of single decoder calls at a batch size: its min is the best guess of uncontended speed."""
    size = decoder.config.image_size
    noisy, repeated = torch.randn(batch, 3, size, size), cond.repeat(batch)
    with torch.no_grad():
        return time_runs(lambda: decoder(noisy, 500, repeated), repeats)


def first_sketch(sampler: SketchSampler, cond: SketchCondition, num_samples: int, steps: int) -> None:
    next(sampler.stream(cond, num_samples=num_samples, num_steps=steps))


def gaussian_image_variances(size: int = 64) -> torch.Tensor:
    """Per-dimension variances of Gaussian 'images' with a 1/f^2 power spectrum, in their Fourier basis."""
    fy = torch.fft.fftfreq(size).abs().view(-1, 1)
    fx = torch.fft.fftfreq(size).abs().view(1, -1)
    power = torch.sqrt(fx**2 + fy**2).clamp(min=1 / size) ** -2
    variances = power.flatten().repeat(3).double()
    return variances / variances.mean() * 0.25


def solve_exact_denoiser(scheduler, num_steps: int, variances: torch.Tensor, num_images: int = 16) -> torch.Tensor:
    """Run ``scheduler`` with the exact denoiser of N(0, diag(variances)) data from fixed noise, given in the
    scheduler's own ``prediction_type`` (the clean image, v or the noise)."""
    scheduler.set_timesteps(num_steps)
    x = torch.randn(num_images, variances.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t in scheduler.timesteps:
        alpha_bar = scheduler.alphas_cumprod[t].double()
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x0 = alpha * variances / (alpha_bar * variances + sigma**2) * x
        output = {"sample": x0, "v_prediction": (alpha * x - x0) / sigma,
                  "epsilon": (x - alpha * x0) / sigma}[scheduler.config.prediction_type]
        x = scheduler.step(output.float(), t, x.float()).prev_sample.double()
    return x


def solver_error_rows(decoder: SketchDecoder, steps: list[int]) -> list[dict]:
    variances = gaussian_image_variances(decoder.config.image_size)
    default = make_default_scheduler(decoder)
    fine = DPMSolverMultistepScheduler.from_config(default.config, use_lu_lambdas=False, thresholding=False)
    reference = solve_exact_denoiser(fine, 500, variances)
    rows = []
    for spacing, use_lu_lambdas in (("uniform_log_snr", True), ("uniform_t", False)):
        for num_steps in steps:
            scheduler = DPMSolverMultistepScheduler.from_config(
                default.config, use_lu_lambdas=use_lu_lambdas, thresholding=False
            )
            x = solve_exact_denoiser(scheduler, num_steps, variances)
            rms = (x - reference).pow(2).mean().sqrt().item()
            rows.append({"bench": "decoder_solver_error", "spacing": spacing, "steps": num_steps, "rms": round(rms, 4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--box-patches", type=int, default=6, help="side of the square target box, in patches")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also time under CPU bf16 autocast")
    parser.add_argument("--json", action="store_true", help="print one JSON line per measurement")
    parser.add_argument("--solver-error", action="store_true", help="only measure step-spacing error (see above)")
    args = parser.parse_args()
    for name, low in (("samples", 1), ("box_patches", 1), ("repeats", 1), ("threads", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if min(args.steps) < 1:
        parser.error(f"--steps must be at least 1, got {min(args.steps)}")
    if args.solver_error:
        for row in solver_error_rows(SketchDecoder(), args.steps):
            print(json.dumps(row) if args.json else f"{row['spacing']:16s} {row['steps']:3d} steps: RMS {row['rms']}")
        return

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    decoder = SketchDecoder().eval()
    if args.box_patches >= min(decoder.config.grid_size):  # a box must leave context around it
        parser.error(f"--box-patches must be below the decoder's grid side {min(decoder.config.grid_size)}, got "
                     f"{args.box_patches}")
    sampler = SketchSampler(decoder)
    cond = box_condition(decoder, args.box_patches)
    params = sum(p.numel() for p in decoder.parameters())
    gflops = flops_per_image_step(decoder, cond) / 1e9
    base = {
        "bench": "decoder_sampling",
        "image_size": decoder.config.image_size,
        "block_out_channels": list(decoder.config.block_out_channels),
        "conditioning": decoder.config.conditioning,
        "params_m": round(params / 1e6, 3),
        "gflops_per_image_step": round(gflops, 3),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    modes = [("fp32", contextlib.nullcontext)]
    if args.bf16:
        modes.append(("bf16_autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16)))
    for mode, context in modes:
        for batch in sorted({1, args.samples}):
            with context():
                single = forward_times(decoder, cond, batch, 6 * args.repeats)
            row = {
                **base,
                "dtype": mode,
                "forward_batch": batch,
                "forward_p50_s": round(statistics.median(single), 4),
                "forward_min_s": round(min(single), 4),
                "loadavg_1m": round(os.getloadavg()[0], 2),
            }
            print(json.dumps(row) if args.json else (
                f"{mode:14s} one decoder call, batch {batch}: p50 {row['forward_p50_s']:.4f} s "
                f"(min {row['forward_min_s']:.4f}), load {row['loadavg_1m']}"
            ), flush=True)
        for steps in args.steps:
            with context():
                full = time_runs(lambda: sampler.sample(cond, args.samples, steps), args.repeats)
                first = time_runs(lambda: first_sketch(sampler, cond, args.samples, steps), args.repeats)
            row = {
                **base,
                "dtype": mode,
                "steps": steps,
                "samples": args.samples,
                "all_p50_s": round(statistics.median(full), 4),
                "all_min_s": round(min(full), 4),
                "first_p50_s": round(statistics.median(first), 4),
                "first_min_s": round(min(first), 4),
                "gflop_per_s": round(gflops * args.samples * steps / min(full), 1),
                "loadavg_1m": round(os.getloadavg()[0], 2),
            }
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(
                    f"{mode:14s} {steps:3d} steps x {args.samples} samples: all p50 {row['all_p50_s']:.3f} s "
                    f"(min {row['all_min_s']:.3f}), first sketch p50 {row['first_p50_s']:.3f} s "
                    f"(min {row['first_min_s']:.3f}), {row['gflop_per_s']} GFLOP/s, load {row['loadavg_1m']}",
                    flush=True,
                )
    if not args.json:
        print(f"params {params / 1e6:.2f} M, {gflops:.2f} GFLOP per image per step at {base['image_size']} px")


if __name__ == "__main__":
    main()
