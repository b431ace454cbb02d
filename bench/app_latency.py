"""Latency of one app request on the CPU: encoder + predictor for one box, 4 streamed sketches, the truth panel.

Times the request as the app's Run button makes it (``ijepa.app_functions.AppFunctions.run``: context encoder,
target encoder, predictor, probe, neighbours, the model view, then the streamed sketches and their gallery): from
the request to the first finished sketch, to the last one (``p50_s``), and to the end of the request
(``full_p50_s``: also the truth-vs-prediction panel, which decodes the true features once more). Reports p50/p90 over
--repeats runs after --warmup runs, and the process's peak RSS. Uses the bundle in
--assets; when it has no model, a random-weight bundle of the default architecture (the CPU recipe's ViT-Tiny at
64 px, default SketchDecoder) is built in a temporary folder: latency does not depend on the weights. The 1-minute
load average is printed so runs on a shared machine can be judged.

With --stop-after S it also times how long a run keeps the device once it is no longer wanted (the app: a new image
shown while sketches are drawn; the new image's work waits for it): a stop is asked S seconds after the first sketch,
through ``should_stop`` as the app does (checked between sampler steps), and, in the same repeats, only between
updates as the app did before 2026-12-08 (``stop_wait_*`` and ``stop_wait_between_updates_*``).

    .venv/bin/python bench/app_latency.py                      # 2 threads, 4 sketches, default steps
    .venv/bin/python bench/app_latency.py --json --precision fp32   # one JSON line; decoder in fp32
    .venv/bin/python bench/app_latency.py --samples 8 --steps 30 --stop-after 1   # and the wait for a stop
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decoder.pipeline import DEFAULT_NUM_STEPS  # noqa: E402
from ijepa.app_functions import AppFunctions  # noqa: E402
from ijepa.bundle import DEFAULT_ASSETS, build_random_bundle  # noqa: E402
from ijepa.engine import MAX_NUM_SAMPLES, MAX_NUM_STEPS, Engine  # noqa: E402
from ijepa.errors import WorkStopped  # noqa: E402
from ijepa.model import IJepaConfig  # noqa: E402

# The CPU recipe's model (train/configs/emoji_cpu.yaml): what assets/model holds by default.
DEFAULT_ARCH = dict(img_size=64, patch_size=8, depth=6, predictor_embed_dim=96, predictor_depth=4)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def one_request(functions: AppFunctions, image: np.ndarray, box: list[float], samples: int, steps: int,
                seed: int) -> tuple[float, float, float]:
    """(seconds to the first sketch, to all sketches, to the end of the request) for one box, from the raw image."""
    start = time.perf_counter()
    first = sketches = None
    for shown in functions.run(functions.analyze(image, [box]), samples, seed, steps):
        if shown.sketches and first is None:
            first = time.perf_counter() - start
        if len(shown.sketches) == samples and sketches is None:
            sketches = time.perf_counter() - start
    return first, sketches, time.perf_counter() - start


def stop_wait(functions: AppFunctions, image: np.ndarray, box: list[float], samples: int, steps: int, seed: int,
              after: float, within_steps: bool) -> float:
    """Seconds a run goes on after a stop is asked ``after`` s past its first sketch: asked through ``should_stop``
    (``within_steps``, the app's way) or read only between updates (the app before 2026-12-08)."""
    asked: list[float] = []
    timer = threading.Timer(after, lambda: asked.append(time.perf_counter()))
    run = functions.run(functions.analyze(image, [box]), samples, seed, steps,
                        should_stop=(lambda: bool(asked)) if within_steps else None)
    try:
        for shown in run:
            if asked:
                break
            if shown.sketches and not timer.is_alive():
                timer.start()
    except WorkStopped:
        pass
    end = time.perf_counter()
    timer.cancel()
    if not asked:
        raise SystemExit(f"the run ended before its stop was asked: lower --stop-after (now {after} s) or draw more")
    return end - asked[0]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=DEFAULT_ASSETS, help="bundle folder (default: assets/)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=DEFAULT_NUM_STEPS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="the decoder's autocast, as the app's --precision (auto: bf16 where native)")
    parser.add_argument("--stop-after", type=float, default=None, metavar="SECONDS",
                        help="also time the wait for a stop asked this long after the first sketch (see above)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    for name, low in (("samples", 1), ("steps", 1), ("repeats", 1), ("warmup", 0), ("threads", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name} must be at least {low}, got {getattr(args, name)}")
    if args.stop_after is not None and args.stop_after < 0:
        parser.error(f"--stop-after must be at least 0, got {args.stop_after}")
    for name, high in (("samples", MAX_NUM_SAMPLES), ("steps", MAX_NUM_STEPS)):  # what the app accepts
        if getattr(args, name) > high:
            parser.error(f"--{name} must be at most {high} (the app's limit), got {getattr(args, name)}")
    if args.assets != DEFAULT_ASSETS and not (args.assets / "model" / "config.json").is_file():
        parser.error(f"--assets {args.assets} is not a bundle (no model/config.json)")

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        assets, weights = args.assets, "trained"
        if not (assets / "model" / "config.json").is_file():
            config = IJepaConfig.from_arch("vit_tiny", **DEFAULT_ARCH)
            assets, weights = build_random_bundle(Path(scratch), config, decoder_kwargs={}, num_examples=0), "random"
        engine = Engine.load(assets, device="cpu", precision=args.precision)
        for note in engine.notes:  # e.g. the default decoder is damaged, so another one is timed
            print(f"note: {note}", file=sys.stderr)
        if not engine.has_decoder:
            raise SystemExit(f"{assets} has no decoder/: the benchmark times sketches")
        size = engine.size
        image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        box = [size * 5 / 16, size * 5 / 16, size * 11 / 16, size * 11 / 16]  # the middle ~35 % of each side
        functions = AppFunctions(engine)
        for i in range(args.warmup):
            one_request(functions, image, box, args.samples, args.steps, seed=i)
        firsts, totals, fulls = [], [], []
        waits: dict[bool, list[float]] = {True: [], False: []}
        for i in range(args.repeats):
            first, total, full = one_request(functions, image, box, args.samples, args.steps, seed=100 + i)
            firsts.append(first)
            totals.append(total)
            fulls.append(full)
            for within_steps in (True, False) if args.stop_after is not None else ():
                waits[within_steps].append(stop_wait(functions, image, box, args.samples, args.steps, 100 + i,
                                                     args.stop_after, within_steps))

    row = {
        "bench": "app_latency",
        "weights": weights,
        "img_size": size,
        "arch": engine.info.arch,
        "decoder": engine.conditionings[0],  # the default one, which the app uses unless switched
        "decoder_channels": list(engine.decoders[engine.conditionings[0]].config.block_out_channels),
        "samples": args.samples,
        "steps": args.steps,
        "threads": args.threads,
        "dtype": "bf16_autocast" if engine.bf16 else "fp32",
        "repeats": args.repeats,
        "p50_s": round(statistics.median(totals), 3),
        "p90_s": round(percentile(totals, 90), 3),
        "first_sketch_p50_s": round(statistics.median(firsts), 3),
        "first_sketch_p90_s": round(percentile(firsts, 90), 3),
        "full_p50_s": round(statistics.median(fulls), 3),
        "full_p90_s": round(percentile(fulls, 90), 3),
        **({} if args.stop_after is None else {
            "stop_after_s": args.stop_after,
            "stop_wait_p50_s": round(statistics.median(waits[True]), 3),
            "stop_wait_max_s": round(max(waits[True]), 3),
            "stop_wait_between_updates_p50_s": round(statistics.median(waits[False]), 3),
            "stop_wait_between_updates_max_s": round(max(waits[False]), 3)}),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(row), flush=True)
    else:
        print(f"{row['arch']} at {size} px, {weights} weights, the {row['decoder']} decoder, {args.samples} sketches x "
              f"{args.steps} steps, {args.threads} threads, {row['dtype']}:\n"
              f"  last sketch p50 {row['p50_s']:.3f} s, p90 {row['p90_s']:.3f} s; first sketch p50 "
              f"{row['first_sketch_p50_s']:.3f} s, p90 {row['first_sketch_p90_s']:.3f} s; whole request with the "
              f"truth panel p50 {row['full_p50_s']:.3f} s, p90 {row['full_p90_s']:.3f} s\n"
              f"  peak RSS {row['peak_rss_mib']:.0f} MiB (load average {row['loadavg_1m']})")
        if args.stop_after is not None:
            print(f"  a stop asked {args.stop_after} s after the first sketch: the run went on for p50 "
                  f"{row['stop_wait_p50_s']:.3f} s (max {row['stop_wait_max_s']:.3f} s) stopping between sampler "
                  f"steps, {row['stop_wait_between_updates_p50_s']:.3f} s (max "
                  f"{row['stop_wait_between_updates_max_s']:.3f} s) stopping only between updates")
    return row


if __name__ == "__main__":
    main()
