"""Train the sketch decoder on a frozen I-JEPA: predictor outputs for a box -> pixels of that box.

    python -m train.decoder --checkpoint runs/tiny/model --out-dir runs/decoder
    python -m train.decoder --checkpoint runs/tiny/model --conditioning pooled --out-dir runs/decoder_paper
    torchrun --nproc_per_node 8 -m train.decoder --checkpoint ... --out-dir ...      # DDP
    python -m train.decoder ... --resume true                                        # exact resume

Each step: emoji scenes (or an image folder), one box shape per step drawn either like an I-JEPA target block or
like a user box (one patch up to half the image's side, varied aspect), context = every other patch. The frozen
predictor supplies the box tokens; for ``true_fraction`` of the samples the target encoder's layer-normed features
of the box are used instead, so the app can render "truth" too. Both live in the same layer-normed space
(ijepa.inference), which is exactly what the app feeds at inference time.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from decoder import SketchCondition, SketchDecoder, SketchSampler, largest_user_box
from ijepa.checkpoint import load_model
from ijepa.device import resolve_precision
from ijepa.inference import gather, predict_features, true_features
from ijepa.masks import MaskConfig, complement_indices, rectangle_indices
from ijepa.model import IJepa
from train.config import (RESUME_HINT, RUN_HELP, config_dict, doc_summary, parse_config, require, require_between,
                          require_positive, run_command, setting)
from train.data import StackFields, StepBatches, build_dataset, check_resumed_data
from train.runtime import (LossWindow, autocast, fused_adamw, load_optimizer_state, plot_loss_curve, resume_state,
                           save_checkpoint, save_config, save_folder_atomic, setup_runtime, start_csv_log,
                           teardown_runtime)

logger = logging.getLogger("train.decoder")
OFFICIAL_TARGETS = MaskConfig()  # the official I-JEPA target blocks: what "target-like" decoder boxes look like


@dataclass
class DecoderTrainConfig:
    checkpoint: str = setting("runs/pretrain/model", "the frozen I-JEPA to draw for: one of our model folders or an "
                              "official .pth.tar")
    out_dir: str = setting("runs/decoder", "run folder: config.yaml, log.csv, loss.png, samples/, checkpoints/, and "
                           "the exported decoder/ (for app.py --decoder) when the run ends")
    data: str = setting("emoji", '"emoji" (the emoji world\'s default scenes, whatever pretraining used) or the path '
                        "of an image folder")
    conditioning: str = setting("spatial_context", '"spatial_context" (ours: every predicted patch feature plus the '
                                'visible surroundings) or "pooled" (as in the I-JEPA paper\'s RCDM setup: the average '
                                "predicted feature only)")
    # decoder architecture
    block_out_channels: tuple[int, int, int] = setting((32, 64, 128), "the UNet's channels at each of its three "
                                                       "resolution levels")
    layers_per_block: int = setting(1, "ResNet layers per UNet block")
    feature_channels: int = setting(16, "channels the predicted patch features are projected to before they join "
                                    "the image (spatial_context only)")
    # x0: a briefly trained decoder draws smooth regions instead of leftover noise (bench/RESULTS.md, "Decoder");
    # "v_prediction" keeps more sample diversity once a decoder is trained long enough
    prediction_type: str = setting("sample", 'what the UNet predicts: "sample" (the clean image, x0), '
                                   '"v_prediction" or "epsilon"')
    # boxes
    target_like_fraction: float = setting(0.5, "fraction of steps whose boxes are drawn like I-JEPA target blocks; "
                                          "the rest like user boxes (one patch up to half the image's side)")
    true_fraction: float = setting(0.25, "fraction of images conditioned on the target encoder's true features "
                                   "instead of the predictor's, so the app can render the truth too")
    # optimisation (batch_size per process)
    batch_size: int = setting(64, "images per step in each process")
    steps: int = setting(4000, "training steps")
    warmup_steps: int = setting(200, "steps of linear lr warmup up to --lr, which then stays constant")
    lr: float = setting(3e-4, "AdamW learning rate after the warmup")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    ema_decay: float = setting(0.999, "the most decay of the EMA of the decoder's weights (the EMA weights are "
                                    "exported); diffusers' EMAModel uses min(this, (1 + step) / (10 + step)): 0.982 "
                                    "at step 500, 0.997 at 3000")
    # runtime
    seed: int = setting(0, "seed of the decoder's initial weights, the scenes, the boxes and the noise")
    device: str = setting("auto", RUN_HELP["device"])
    precision: str = setting("auto", RUN_HELP["precision"])
    num_workers: int = setting(1, "DataLoader worker processes per training process, which build the images "
                               "(0: the training process itself)")
    log_every: int = setting(25, "steps between rows of log.csv and progress updates (loss, lr, img/s)")
    sample_every: int = setting(500, "steps between preview sheets in samples/, drawn with the EMA weights (the "
                                "last step always draws one)")
    ckpt_every: int = setting(500, RUN_HELP["ckpt_every"])
    keep_last: int = setting(2, RUN_HELP["keep_last"])
    resume: bool = setting(False, RUN_HELP["resume"])
    allow_changes: tuple[str, ...] = setting((), "with --resume: schedule settings that may differ from the "
                                             "checkpoint's, e.g. lr (any of lr, warmup_steps, steps, weight_decay, "
                                             "ema_decay)")

    def __post_init__(self) -> None:
        require_positive(self, ("batch_size", "steps", "log_every", "sample_every", "ckpt_every", "layers_per_block",
                                "feature_channels", "lr"))
        require(self, all(c > 0 for c in self.block_out_channels),
                f"block_out_channels must be positive, got {self.block_out_channels}")
        require_between(self, ("seed", "warmup_steps", "keep_last", "num_workers", "weight_decay"), 0)
        require_between(self, ("target_like_fraction", "true_fraction", "ema_decay"), 0, 1)


class DecoderLoss(nn.Module):
    """Routes ``training_loss`` through ``forward`` so DistributedDataParallel synchronises its gradients."""

    def __init__(self, decoder: SketchDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, images: torch.Tensor, cond: SketchCondition, generator: torch.Generator) -> torch.Tensor:
        return self.decoder.training_loss(images, cond, generator)


def sample_box_shape(grid: tuple[int, int], rng: np.random.Generator, target_like_fraction: float) -> tuple[int, int]:
    """(rows, cols) of this step's boxes: I-JEPA target-like (the official target blocks, ``MaskConfig``'s defaults:
    15-20 % of the grid, aspect 0.75-1.5) or user-like (1 patch up to half the image side, any aspect).

    Both kinds stay within ``largest_user_box``, the limit the app names as what a decoder learnt: a tall target
    block on a 14x14 or 16x16 grid (8x5, 9x6) is cut to it. On 8x8 grids none exceeds it: their draws are as before."""
    gh, gw = grid
    max_rows, max_cols = largest_user_box(grid)
    if rng.random() < target_like_fraction:
        scale, aspect = rng.uniform(*OFFICIAL_TARGETS.target_scale), rng.uniform(*OFFICIAL_TARGETS.target_aspect)
        area = scale * gh * gw
        rows = int(np.clip(round(math.sqrt(area * aspect)), 1, max_rows))
        cols = int(np.clip(round(math.sqrt(area / aspect)), 1, max_cols))
        return rows, cols
    return int(rng.integers(1, max_rows + 1)), int(rng.integers(1, max_cols + 1))


def sample_boxes(batch: int, grid: tuple[int, int], rng: np.random.Generator,
                 target_like_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One box shape for the whole batch at random places -> (target indices [B, K], context indices [B, N-K])."""
    rows, cols = sample_box_shape(grid, rng, target_like_fraction)
    origins = torch.from_numpy(np.stack([rng.integers(0, grid[0] - rows + 1, batch),
                                         rng.integers(0, grid[1] - cols + 1, batch)], axis=1))
    targets = rectangle_indices(origins, rows, cols, grid)
    return targets, complement_indices(targets, grid[0] * grid[1])


@torch.no_grad()
def box_conditions(model: IJepa, images: torch.Tensor, targets: torch.Tensor, contexts: torch.Tensor,
                   use_true: torch.Tensor | None = None) -> SketchCondition:
    """Images in [0, 1] + boxes -> the decoder's condition: predicted box tokens (true ones where ``use_true``)."""
    tokens = predict_features(model, images, contexts, [targets])[0].float()
    if use_true is not None and use_true.any():
        truth = gather(true_features(model, images), targets).float()
        tokens = torch.where(use_true.view(-1, 1, 1), truth, tokens)
    return SketchCondition.from_image(images * 2 - 1, tokens, targets, model.config.grid_size)


def build_decoder(cfg: DecoderTrainConfig, model: IJepa) -> SketchDecoder:
    return SketchDecoder(feature_dim=model.config.embed_dim, grid_size=model.config.grid_size,
                         image_size=model.config.img_size, conditioning=cfg.conditioning,
                         feature_channels=cfg.feature_channels, block_out_channels=tuple(cfg.block_out_channels),
                         layers_per_block=cfg.layers_per_block, prediction_type=cfg.prediction_type,
                         model_signature=tuple(model.feature_signature()))


@torch.no_grad()
def save_sample_grid(decoder: SketchDecoder, model: IJepa, images: torch.Tensor, targets: torch.Tensor,
                     contexts: torch.Tensor, path: Path, num_samples: int = 3) -> None:
    """Rows: input with the box, 3 sketches from the PREDICTED features, 1 rendering of the TRUE features."""
    from torchvision.utils import save_image

    predicted = box_conditions(model, images, targets, contexts)
    every = torch.ones(len(images), dtype=torch.bool, device=images.device)
    truth = box_conditions(model, images, targets, contexts, use_true=every)
    sampler = SketchSampler(decoder)
    sketches = sampler.sample(predicted, num_samples=num_samples, seed=0).view(len(images), num_samples, 3,
                                                                                *images.shape[-2:])
    rendered = sampler.sample(truth, num_samples=1, seed=0).view(len(images), 1, 3, *images.shape[-2:])
    shown = images.clone()
    red = torch.tensor([1.0, 0, 0], device=images.device).view(1, 3, 1, 1)
    shown = torch.where(predicted.box_mask.bool(), 0.5 * shown + 0.5 * red, shown)
    grid = torch.cat([shown.unsqueeze(1), sketches, rendered], dim=1).flatten(0, 1)
    save_image(grid, path, nrow=num_samples + 2, padding=2, pad_value=1.0)


def train(cfg: DecoderTrainConfig) -> SketchDecoder:
    """Train (or resume); exports the EMA decoder to ``<out_dir>/decoder`` and returns it."""
    rt = setup_runtime(cfg.device)
    precision = resolve_precision(rt.device, cfg.precision)
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    state, resumed_from = resume_state(ckpt_dir, cfg, rt.world_size, holds="decoder")

    model = load_model(cfg.checkpoint).to(rt.device).eval()
    if model.predictor is None:
        raise ValueError(f"{cfg.checkpoint} has no predictor: the decoder learns to draw predictor outputs")
    if cfg.data == "emoji" and not model.config.data_fingerprint and rt.is_main:
        logger.warning("%s does not say it learnt the emoji world (trained on: %s), yet this decoder will learn from "
                       "emoji scenes: pass --data with a folder of the model's own kind of images", cfg.checkpoint,
                       model.config.trained_on or "not recorded")
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    decoder = build_decoder(cfg, model).to(rt.device)
    ema = EMAModel(decoder.parameters(), decay=cfg.ema_decay, foreach=True)
    use_cuda = rt.device.type == "cuda"
    optimizer = fused_adamw(decoder.parameters(), cfg.lr, cfg.weight_decay)
    start_step, resumed_seconds, saved_data = 0, 0.0, None
    if state is not None:
        # the same path can hold other weights by now (a model folder exported again): the checkpoint names its own
        if "model_signature" in state and not model.has_signature(state["model_signature"]):
            raise ValueError(f"cannot resume from {resumed_from}: {cfg.checkpoint} is no longer the model this "
                             "decoder was trained on (its weights changed since), so the run would not continue "
                             "exactly. Point --checkpoint at that model, or choose another --out-dir (nothing was "
                             "overwritten).")
        decoder.load_state_dict(state["decoder"])
        ema.load_state_dict(state["ema"])
        ema.to(rt.device)  # its weights were loaded onto the CPU; the decoder's live on rt.device
        load_optimizer_state(optimizer, state["optimizer"])
        start_step, resumed_seconds = state["step"], state.get("elapsed_s", 0.0)
        saved_data = state.get("data_fingerprint")
        del state  # the optimizer and weights hold their own copies now
        logger.info("resumed from %s at step %d", resumed_from, start_step)
    loss_module = DecoderLoss(decoder)
    if rt.distributed:
        loss_module = DDP(loss_module, device_ids=[rt.local_rank] if use_cuda else None)

    grid = model.config.grid_size
    dataset = build_dataset(cfg.data, resolution=model.config.img_size, patch_size=model.config.patch_size,
                            seed=cfg.seed + 1)  # the world's default scenes, not pretraining's settings or seed
    check_resumed_data(saved_data, dataset, resumed_from)
    if rt.is_main:  # only now: a resume refused above leaves the run's config as it was
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    loader = DataLoader(dataset, batch_sampler=StepBatches(start_step, cfg.steps, cfg.batch_size, rt.rank,
                                                           rt.world_size),
                        collate_fn=StackFields(("image",)),
                        num_workers=cfg.num_workers, pin_memory=use_cuda)
    preview = build_dataset(cfg.data, resolution=model.config.img_size, patch_size=model.config.patch_size,
                            seed=cfg.seed + 2)
    preview_images = torch.stack([preview[i]["image"] for i in range(6)]).to(rt.device)
    preview_targets, preview_contexts = sample_boxes(6, grid, np.random.default_rng(cfg.seed), 0.5)

    csv_path = out_dir / "log.csv"
    if rt.is_main:
        start_csv_log(csv_path, "step,loss,lr,img_per_s,elapsed_s", start_step)
    progress = tqdm(total=cfg.steps, initial=start_step, disable=not rt.is_main, dynamic_ncols=True, unit="step")
    # elapsed_s counts on from the checkpoint, so the log (and the recipe's stage time) covers the whole run
    run_start = time.perf_counter() - resumed_seconds
    window = LossWindow(rt, ckpt_dir)
    decoder.train()

    for step, batch in enumerate(loader, start=start_step):
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        rng = np.random.default_rng([cfg.seed, step, rt.rank])  # boxes and the truth/prediction mix
        generator = torch.Generator(rt.device).manual_seed(cfg.seed * 1_000_003 + step * 1009 + rt.rank)

        images = batch["image"].to(rt.device, non_blocking=True)
        targets, contexts = sample_boxes(len(images), grid, rng, cfg.target_like_fraction)
        use_true = torch.from_numpy(rng.random(len(images)) < cfg.true_fraction)
        with autocast(rt.device, precision):
            cond = box_conditions(model, images, targets.to(rt.device), contexts.to(rt.device),
                                  use_true.to(rt.device))
            loss = loss_module(images * 2 - 1, cond, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.step(decoder.parameters())

        window.add(loss)
        done = step + 1
        progress.update(1)
        if window.due(done, cfg):
            # stops the run on a NaN/inf loss or weight, before any save
            mean_loss, seconds, steps = window.close(done, [*decoder.parameters(), *ema.shadow_params])
            if rt.is_main:
                img_per_s = steps * cfg.batch_size * rt.world_size / seconds
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.1e}", img_s=f"{img_per_s:.0f}")
                with open(csv_path, "a") as f:
                    f.write(f"{done},{mean_loss:.6f},{lr:.6g},{img_per_s:.1f},{time.perf_counter() - run_start:.1f}\n")
        if rt.is_main and (done % cfg.sample_every == 0 or done == cfg.steps):
            preview_start = time.perf_counter()
            ema.store(decoder.parameters())
            ema.copy_to(decoder.parameters())
            decoder.eval()
            save_sample_grid(decoder, model, preview_images, preview_targets.to(rt.device),
                             preview_contexts.to(rt.device), out_dir / "samples" / f"step-{done:07d}.png")
            decoder.train()
            ema.restore(decoder.parameters())
            window.pause(time.perf_counter() - preview_start)  # img/s counts training only
        if rt.is_main and (done % cfg.ckpt_every == 0 or done == cfg.steps):
            state = {"decoder": decoder.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                     "step": done, "config": config_dict(cfg), "elapsed_s": time.perf_counter() - run_start,
                     "world_size": rt.world_size, "model_signature": model.feature_signature(),
                     "data_fingerprint": getattr(dataset, "fingerprint", None)}
            save_checkpoint(state, ckpt_dir, done, cfg.keep_last)
    progress.close()

    ema.copy_to(decoder.parameters())  # export the EMA weights
    decoder.eval()
    if rt.is_main:
        save_folder_atomic(decoder.save_pretrained, out_dir / "decoder")  # its config.json marks a finished run
        plot_loss_curve(csv_path, out_dir / "loss.png", title=f"decoder ({cfg.conditioning}) denoising loss")
        logger.info("exported %s", out_dir / "decoder")
    if rt.distributed:
        dist.barrier()
    teardown_runtime(rt)
    return decoder


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    train(parse_config(DecoderTrainConfig, argv, description=doc_summary(__doc__)))


if __name__ == "__main__":
    raise SystemExit(run_command(main, interrupted=RESUME_HINT))
