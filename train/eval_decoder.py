"""Score sketch decoders on held-out scenes: re-encode consistency, retrieval, diversity, context exactness.

    python -m train.eval_decoder --checkpoint runs/tiny/model \
        --decoder runs/decoder/decoder --paper-decoder runs/decoder_paper/decoder --out-dir runs/decoder_eval

For each (image, box) the decoder draws ``num_samples`` sketches from the PREDICTOR's box tokens. Each sketch is
re-encoded by the target encoder and its layer-normed box features are average-pooled:
- consistency: mean cosine between that and the pooled conditioning tokens (same layer-normed space);
- retrieval: top-1 of finding the sketch's own conditioning among ``gallery`` candidates (>= 64) by cosine;
  its floor is the same with the box filled grey (``grey_box_top1``): the target encoder sees the true
  surroundings too, so they alone find some boxes, far above the uniform ``chance_top1``;
- diversity: mean pairwise RMS pixel distance between the sketches inside the box (in [0, 1] units);
- context: the largest 8-bit pixel change outside the box (must be exactly 0).
Every decoder is scored on the same images, boxes and seeds, in one run.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from decoder import SketchDecoder, SketchSampler, box_mask_from_indices
from ijepa.bundle import load_decoder
from ijepa.checkpoint import load_model
from ijepa.device import PRECISIONS, resolve_device, resolve_precision
from ijepa.inference import gather, true_features
from ijepa.masks import pooled
from ijepa.model import IJepa
from train.config import doc_summary, run_command
from train.data import build_dataset, require_data_source
from train.decoder import box_conditions, sample_boxes
from train.runtime import autocast, write_json_atomic

logger = logging.getLogger("train.eval_decoder")


@torch.no_grad()
def evaluate_decoder(model: IJepa, decoder: SketchDecoder,
                     groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], num_samples: int = 4,
                     num_steps: int = 12, seed: int = 0, precision: str = "fp32") -> tuple[dict, torch.Tensor]:
    """Metrics for one decoder over groups of (images [b, 3, H, W] in [0, 1], targets [b, K], contexts [b, N-K])
    (one box shape per group); the retrieval gallery is every (image, box) of every group.
    Also returns the sketches [n, S, 3, H, W] in group order.

    ``precision="bf16"`` runs the UNet under bf16 autocast (the solver state stays float32): on a 2-core CPU with
    AVX512-BF16 it is 2.1x faster at this batch size with the same metrics to three decimals (bench/RESULTS.md);
    pass a precision resolved by ``ijepa.device.resolve_precision``."""
    if num_samples < 2:
        raise ValueError(f"diversity compares sketches of one box: num_samples must be at least 2, got {num_samples}")
    sampler = SketchSampler(decoder)
    conditions, reencoded, sketches, diversity, outside_change, grey_boxes = [], [], [], [], 0.0, []
    for images, targets, contexts in groups:
        cond = box_conditions(model, images, targets, contexts)
        grey = torch.where(cond.box_mask.bool(), 0.5, images)  # the surroundings alone, nothing drawn in the box
        grey_boxes.append(pooled(gather(true_features(model, grey), targets)))
        with autocast(images.device, precision):
            out = sampler.sample(cond, num_samples=num_samples, num_steps=num_steps, seed=seed)
        reencoded.append(pooled(gather(true_features(model, out), targets.repeat_interleave(num_samples, 0))))
        out = out.view(len(images), num_samples, *out.shape[1:])
        inside = cond.box_mask.bool().unsqueeze(1).expand_as(out)  # [b, S, 3, H, W]
        to_8bit = lambda x: (x * 255).round()  # noqa: E731 - what a PNG of the result would hold
        change = (to_8bit(out) - to_8bit(images).unsqueeze(1)).abs()[~inside]
        outside_change = max(outside_change, change.max().item())
        pixels = out[inside].view(len(images), num_samples, -1)  # the box's pixels of each sketch
        pairwise = torch.cdist(pixels, pixels) / pixels.size(-1) ** 0.5  # RMS distance, [b, S, S]
        diversity.append(pairwise.sum((1, 2)) / (num_samples * (num_samples - 1)))
        conditions.append(cond.pooled_tokens().float())
        sketches.append(out)
    cond_feats = F.normalize(torch.cat(conditions), dim=-1)  # [n, D]
    sketch_feats = F.normalize(torch.cat(reencoded).float(), dim=-1).view(len(cond_feats), num_samples, -1)
    cosine = (sketch_feats * cond_feats.unsqueeze(1)).sum(-1)
    nearest = torch.einsum("nsd,md->nsm", sketch_feats, cond_feats).argmax(-1)
    own = torch.arange(len(cond_feats), device=nearest.device)
    retrieval = (nearest == own.unsqueeze(1)).float().mean()
    grey_feats = F.normalize(torch.cat(grey_boxes).float(), dim=-1)
    grey_top1 = (grey_feats @ cond_feats.T).argmax(-1).eq(own).float().mean()
    metrics = {"reencode_cosine": cosine.mean().item(), "retrieval_top1": 100.0 * retrieval.item(),
               "gallery": len(cond_feats), "chance_top1": 100.0 / len(cond_feats),
               "grey_box_top1": 100.0 * grey_top1.item(),
               "grey_box_cosine": (grey_feats * cond_feats).sum(-1).mean().item(),
               "diversity_rms": torch.cat(diversity).mean().item(), "max_context_change_8bit": outside_change}
    return metrics, torch.cat(sketches)


def _box_pixels(target: torch.Tensor, model: IJepa) -> torch.Tensor:
    size = model.config.img_size
    return box_mask_from_indices(target.view(1, -1).cpu(), model.config.grid_size, (size, size))[0]


def plot_grids(images: torch.Tensor, targets: list[torch.Tensor], results: dict[str, torch.Tensor], model: IJepa,
               path: Path, rows: int = 8) -> None:
    """One row per (image, box): the input with the box shaded, then each decoder's sketches."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    samples = next(iter(results.values())).size(1)
    cols = 1 + samples * len(names)
    rows = min(rows, len(images))
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows + 0.4), dpi=110, squeeze=False)
    for r in range(rows):
        shown = images[r].clone()
        mask = _box_pixels(targets[r], model).bool().expand(3, -1, -1)
        shown[mask] = 0.5 * shown[mask] + 0.25
        panels = [shown] + [results[n][r, s] for n in names for s in range(samples)]
        for c, panel in enumerate(panels):
            axes[r, c].imshow(panel.permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title("input" if c == 0 else names[(c - 1) // samples], fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=doc_summary(__doc__))
    parser.add_argument("--checkpoint", required=True, help="the frozen I-JEPA the decoders were trained on")
    parser.add_argument("--decoder", required=True, help="our decoder (save_pretrained folder)")
    parser.add_argument("--paper-decoder", default=None, help="the paper-faithful (pooled) decoder, same run")
    parser.add_argument("--data", default="emoji", help="emoji (held-out emoji scenes) or an image folder, read "
                        "as centre crops: pass one the decoder did not train on (e.g. a validation split)")
    parser.add_argument("--num-images", type=int, default=128, help="(image, box) pairs = retrieval gallery size, "
                        "at least 64 (rounded up to a multiple of 16: one box shape per 16 images)")
    parser.add_argument("--num-samples", type=int, default=4, help="sketches per box (at least 2: diversity)")
    parser.add_argument("--num-steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the UNet's autocast dtype (auto: bf16 where it is native, else fp32)")
    parser.add_argument("--out-dir", default="runs/decoder_eval")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N or mps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    problem = gallery_problem(args.num_images, args.num_samples, args.num_steps)
    if problem:
        parser.error(problem)
    if args.seed < 0:
        parser.error(f"--seed must be at least 0, got {args.seed}")
    report = evaluate_decoders(args.checkpoint, args.decoder, args.paper_decoder, Path(args.out_dir), args.data,
                               args.num_images, args.num_samples, args.num_steps, args.seed, args.precision,
                               args.device)
    print(json.dumps(report, indent=2))
    return report


def gallery_problem(num_images: int, num_samples: int, num_steps: int) -> str | None:
    """What makes a gallery impossible to score, or None: retrieval needs 64 candidates, diversity two sketches, and
    drawing them a solver step. Checked before anything loads or the out-dir is made."""
    if num_images < 64:
        return f"--num-images must be >= 64 so retrieval has at least 64 candidates, got {num_images}"
    if num_samples < 2:
        return f"--num-samples must be >= 2: diversity compares the sketches of one box, got {num_samples}"
    if num_steps < 1:
        return f"--num-steps must be >= 1: the sampler takes at least one solver step, got {num_steps}"
    return None


def load_checked_kind(path: str | Path, must_pool: bool, model: IJepa, checkpoint: str | Path) -> SketchDecoder:
    """The decoder for --decoder (ours) or --paper-decoder (``must_pool``), checked against the model and for its
    kind, float32."""
    loaded = load_decoder(path, model, checkpoint)
    if (loaded.config.conditioning == "pooled") != must_pool:
        flag, takes, fix = {
            True: ("--paper-decoder", "the paper-faithful (pooled) one",
                   "pass it as --decoder, and a pooled one (python -m train.decoder --conditioning pooled) as "
                   "--paper-decoder"),
            False: ("--decoder", "ours", "pass it as --paper-decoder, and ours as --decoder"),
        }[must_pool]
        raise ValueError(f"{path} is a {loaded.config.conditioning} decoder, but {flag} takes {takes}: {fix}")
    return loaded


def evaluate_decoders(checkpoint: str | Path, decoder: str | Path, paper_decoder: str | Path | None, out_dir: Path,
                      data: str = "emoji", num_images: int = 128, num_samples: int = 4, num_steps: int = 12,
                      seed: int = 0, precision: str = "auto", device: str = "auto") -> dict:
    """Score our decoder (and the paper-faithful one beside it) on the same images, boxes and noise: results.json
    (written last: the recipe takes it as "evaluation finished") and samples.png in ``out_dir``."""
    problem = gallery_problem(num_images, num_samples, num_steps)
    if problem:
        raise ValueError(problem)
    require_data_source(data)  # as the out-dir: refused now, not after the model and decoders have loaded
    out_dir.mkdir(parents=True, exist_ok=True)  # a file there is refused now, not after minutes of scoring
    start = time.perf_counter()
    device = resolve_device(device)
    precision = resolve_precision(torch.device(device), precision)
    model = load_model(checkpoint).to(device).eval()
    # both loaded and checked before the first is scored (minutes), so a typo in the second costs nothing
    decoders = {"ours (spatial + context)": (decoder, False), "paper (pooled only)": (paper_decoder, True)}
    decoders = {name: (path, load_checked_kind(path, must_pool, model, checkpoint).to(device))
                for name, (path, must_pool) in decoders.items() if path}
    # held-out emoji, scenes no training run drew (seeds differ from pretraining and decoder training); a folder
    # as it is, centre-cropped, without the training crops' randomness
    extra = {"split": "heldout"} if data == "emoji" else {"mode": "eval"}
    dataset = build_dataset(data, resolution=model.config.img_size, patch_size=model.config.patch_size,
                            seed=seed + 777, **extra)
    group_size = 16
    num_groups = -(-num_images // group_size)  # one box shape per group of images
    needed = num_groups * group_size
    if len(dataset) < needed:  # a folder read round again would put the same (image, box) pairs in the gallery
        fits = len(dataset) // group_size * group_size
        instead = f"pass --num-images {fits} or less, or" if fits >= 64 else "scoring needs at least 64: pass"
        raise ValueError(f"{data} holds {len(dataset)} images and --num-images {num_images} needs {needed} distinct "
                         f"ones: {instead} a larger folder")
    groups, rng, index = [], np.random.default_rng(seed), 0
    for _ in range(num_groups):
        images = torch.stack([dataset[index + j]["image"] for j in range(group_size)]).to(device)
        targets, contexts = sample_boxes(group_size, model.config.grid_size, rng, target_like_fraction=0.5)
        groups.append((images, targets.to(device), contexts.to(device)))
        index += group_size
    report = {"num_images": index, "num_samples": num_samples, "num_steps": num_steps, "precision": precision,
              "data": "held-out emoji scenes" if data == "emoji" else f"{data} (centre crops)", "decoders": {}}
    grids = {}
    for name, (path, loaded) in decoders.items():
        metrics, grids[name] = evaluate_decoder(model, loaded, groups, num_samples, num_steps, seed, precision)
        report["decoders"][name] = {"path": str(path), "conditioning": loaded.config.conditioning, **metrics}
        logger.info("%s: %s", name, metrics)
    out_dir.mkdir(parents=True, exist_ok=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    all_images = torch.cat([g[0] for g in groups]).cpu()
    all_targets = [t.cpu() for g in groups for t in g[1]]
    plot_grids(all_images[::group_size], all_targets[::group_size],
               {k: v[::group_size].cpu() for k, v in grids.items()}, model, out_dir / "samples.png")
    write_json_atomic(out_dir / "results.json", report)
    return report


if __name__ == "__main__":
    raise SystemExit(run_command(main))
