"""I-JEPA pretraining: one readable loop.

Single process, on a CPU or on one GPU:
    python -m train.pretrain --config train/configs/emoji_cpu.yaml --out-dir runs/tiny
    python -m train.pretrain --config train/configs/emoji_gpu.yaml --out-dir runs/tiny_gpu
Several GPUs on one node (DDP, NCCL) or several CPU processes (gloo):
    torchrun --nproc_per_node 8 -m train.pretrain --config train/configs/emoji_gpu.yaml
Several nodes (run on every node; SLURM users: see README "Multi-node"):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m train.pretrain ...
Resume exactly (same step, schedules, data order and masks) after an interruption:
    python -m train.pretrain --config ... --out-dir runs/tiny --resume true

Why it is fast: bf16 autocast (no GradScaler), timm's fused SDPA attention (for CPU bf16 only in the target
pass, plain attention elsewhere, where it is faster), fused AdamW, the EMA as one
``torch._foreach_lerp_``, masks built in DataLoader workers, optional torch.compile, and no host sync per step
(the loss is read only every ``log_every`` steps).
"""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from ijepa.checkpoint import save_model
from ijepa.device import resolve_precision
from ijepa.masks import MaskCollator, MaskConfig
from ijepa.model import IJepa, IJepaConfig
from ijepa.vision_transformer import set_fused_attention
from train.config import (RESUME_HINT, RUN_HELP, config_dict, doc_summary, parse_config, require_between,
                          require_positive, run_command, setting)
from train.data import StepBatches, build_dataset, check_resumed_data
from train.emoji import EmojiScenes, get_catalog
from train.eval import HeldOutKnn, plot_knn_curve
from train.objective import (TargetFeatures, ema_momentum, ema_update, ijepa_loss, learning_rate, param_groups,
                             set_optimizer_schedule, target_spread, weight_decay)
from train.runtime import (LossWindow, Runtime, autocast, fused_adamw, load_optimizer_state, plot_loss_curve,
                           resume_state, save_checkpoint, save_config, save_folder_atomic, setup_runtime,
                           start_csv_log, teardown_runtime)

logger = logging.getLogger("train.pretrain")
EMOJI_WORLD = "emoji scenes (Noto Color Emoji)"  # what a model trained on the built-in world says it saw
# target_spread below this at a logging step: warn that the representation has collapsed (healthy runs: ~0.4)
COLLAPSED_SPREAD = 0.1


# The config fields that shape the emoji world; the decoder trains on EmojiScenes' defaults, so these start there.
SCENE_FIELDS = ("backgrounds", "same_base_prob", "main_scale", "num_distractors", "distractor_scale", "balance",
                "theme_prob", "theme")
_SCENE_DEFAULTS = {name: inspect.signature(EmojiScenes).parameters[name].default for name in SCENE_FIELDS}


@dataclass
class PretrainConfig:
    out_dir: str = setting("runs/pretrain", "run folder: config.yaml, log.csv, loss.png, checkpoints/, and the "
                           "exported model/ when the run ends")
    data: str = setting("emoji", '"emoji" (the built-in emoji scenes, drawn on the fly) or the path of an image '
                        "folder (class sub-folders or flat)")
    img_size: int = setting(64, "input side in pixels, a multiple of --patch-size")
    # model
    arch: str = setting("vit_tiny", "encoder family: vit_tiny, vit_small, vit_base, vit_large, vit_huge or vit_giant")
    patch_size: int = setting(4, "patch side in pixels: the grid is img_size / patch_size patches on a side")
    depth: int | None = setting(None, "encoder blocks where not the family's own (none), e.g. 6 for the CPU "
                                "recipes' smaller model")
    predictor_embed_dim: int = setting(96, "the predictor's width")
    predictor_depth: int = setting(6, "the predictor's number of blocks")
    # multi-block masks (official defaults)
    num_targets: int = setting(4, "target blocks the predictor predicts per image")
    target_scale: tuple[float, float] = setting((0.15, 0.2), "range of a target block's area, as a fraction of the "
                                                "patch grid")
    target_aspect: tuple[float, float] = setting((0.75, 1.5), "range of a target block's aspect ratio (height / "
                                                 "width)")
    context_scale: tuple[float, float] = setting((0.85, 1.0), "range of the context block's area, as a fraction of "
                                                 "the patch grid, before the targets are taken out of it")
    min_keep: int = setting(10, "an image's context keeps more than this many patches")
    official_quirks: bool = setting(False, "reproduce the official collator's sampling: blocks never touch the last "
                                    "row or column, one draw of scale and aspect, raster-prefix truncation")
    # the target: "layer" (the paper's per-token LayerNorm) or "instance" (each feature normalised over the image's
    # tokens first, data2vec-style); target_layers > 1 averages the last blocks' outputs (needs "instance")
    target_norm: str = setting("layer", 'what the predictor predicts: "layer" (the paper\'s target: the target '
                               'encoder\'s last block, layer-normed per token) or "instance" (data2vec\'s: each '
                               "feature normalised over the image's tokens first)")
    target_layers: int = setting(1, "average the outputs of the target encoder's last N blocks as the target "
                                 "(N > 1 needs --target-norm instance)")
    # initial weights: the official constructors scale block i's residual projections by 1/sqrt(2 i); the official
    # training script redraws them unscaled (false, as configs/in1k_vith14.yaml). The emoji recipes were measured
    # with the scaling.
    rescale_residual_init: bool = setting(True, "scale block i's residual projections by 1/sqrt(2 i) at init, as "
                                          "the official constructors do (false: unscaled, as the official training "
                                          "script redraws them)")
    # emoji scenes only: passed to train/emoji.py EmojiScenes, whose defaults they take
    backgrounds: tuple[str, ...] = setting(_SCENE_DEFAULTS["backgrounds"], "emoji only: the background kinds a "
                                           "scene's is drawn from, uniformly (the default lists the seven "
                                           "the probes use; 'patchwork' may be added)")
    same_base_prob: float = setting(_SCENE_DEFAULTS["same_base_prob"], "emoji only: probability that a distractor "
                                    "is another instance of the main emoji's base")
    main_scale: tuple[float, float] = setting(_SCENE_DEFAULTS["main_scale"], "emoji only: range of the main "
                                              "emoji's longer side, as a fraction of the image side")
    num_distractors: tuple[int, int] = setting(_SCENE_DEFAULTS["num_distractors"], "emoji only: inclusive range "
                                               "of the number of distractors beside the main emoji")
    distractor_scale: tuple[float, float] = setting(_SCENE_DEFAULTS["distractor_scale"], "emoji only: range of a "
                                                    "distractor's longer side, as a fraction of the image side")
    balance: str = setting(_SCENE_DEFAULTS["balance"], 'emoji only: "base" draws every base emoji equally often; '
                           '"subgroup" each Unicode subgroup equally often, then a base within it')
    theme_prob: float = setting(_SCENE_DEFAULTS["theme_prob"], "emoji only: probability that a distractor shares "
                                "the main emoji's --theme (the recipes' still life: 1.0 with 2,3 distractors)")
    theme: str = setting(_SCENE_DEFAULTS["theme"], 'emoji only: the Unicode label a themed distractor shares with '
                         'the main emoji, "subgroup" or "group"')
    # optimisation (batch_size is per process)
    batch_size: int = setting(256, "images per step in each process (the global batch is this times the number "
                              "of processes)")
    steps: int = setting(2000, "training steps; the lr, weight-decay and EMA schedules span them")
    warmup_steps: int = setting(200, "steps of linear lr warmup from --start-lr to --lr")
    start_lr: float = setting(2e-4, "learning rate at the first step")
    lr: float = setting(1e-3, "peak learning rate, reached after the warmup, then decayed by a cosine to "
                        "--final-lr")
    final_lr: float = setting(1e-6, "learning rate at the last step")
    weight_decay: float = setting(0.04, "AdamW weight decay at the first step (biases and 1-D parameters get "
                                  "none); it rises by a cosine to --final-weight-decay")
    final_weight_decay: float = setting(0.4, "weight decay at the last step")
    ema_start: float = setting(0.996, "momentum of the target encoder's EMA at the first step; it rises linearly "
                               "to --ema-end over the run")
    ema_end: float = setting(1.0, "EMA momentum at the last step")
    # runtime
    seed: int = setting(0, "seed of the initial weights, the scenes (or the image folder's order) and the masks")
    device: str = setting("auto", RUN_HELP["device"])
    precision: str = setting("auto", RUN_HELP["precision"])
    compile: bool = setting(False, "torch.compile the encoder, the predictor and the target pass")
    num_workers: int = setting(2, "DataLoader worker processes per training process, which build the images and "
                               "masks (0: the training process itself)")
    log_every: int = setting(20, "steps between rows of log.csv and progress updates (loss, target spread, lr, "
                             "img/s)")
    ckpt_every: int = setting(500, RUN_HELP["ckpt_every"])
    keep_last: int = setting(2, RUN_HELP["keep_last"])
    knn_every: int = setting(0, "emoji only: score the held-out kNN protocol every N steps and at the end, into "
                             "knn.csv and knn.png (0: never)")
    resume: bool = setting(False, RUN_HELP["resume"])
    allow_changes: tuple[str, ...] = setting((), "with --resume: schedule settings that may differ from the "
                                             "checkpoint's, e.g. lr (any of lr, start_lr, final_lr, warmup_steps, "
                                             "steps, weight_decay, final_weight_decay, ema_start, ema_end)")
    trained_on: str = setting(EMOJI_WORLD, "what the exported model says it was trained on (the app shows it); "
                              "with --data an image folder and this not set, the folder's name")

    def __post_init__(self) -> None:
        require_positive(self, ("batch_size", "steps", "log_every", "ckpt_every", "lr", "img_size", "patch_size"))
        require_between(self, ("seed", "warmup_steps", "keep_last", "knn_every", "num_workers", "start_lr", "final_lr",
                               "weight_decay", "final_weight_decay"), 0)
        require_between(self, ("ema_start", "ema_end", "same_base_prob", "theme_prob"), 0, 1)


def model_config(cfg: PretrainConfig) -> IJepaConfig:
    trained_on = cfg.trained_on
    if cfg.data != "emoji" and trained_on == EMOJI_WORLD:  # left at the default: name the folder, not emoji
        trained_on = f"images in the folder {Path(cfg.data).name!r}"
    overrides = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, predictor_embed_dim=cfg.predictor_embed_dim,
                     predictor_depth=cfg.predictor_depth, trained_on=trained_on,
                     target_norm=cfg.target_norm, target_layers=cfg.target_layers)
    if cfg.depth is not None:
        overrides["depth"] = cfg.depth
    if cfg.data == "emoji":
        overrides["data_fingerprint"] = get_catalog().fingerprint
    return IJepaConfig.from_arch(cfg.arch, **overrides)


def mask_config(cfg: PretrainConfig) -> MaskConfig:
    return MaskConfig(num_targets=cfg.num_targets, target_scale=cfg.target_scale, target_aspect=cfg.target_aspect,
                      context_scale=cfg.context_scale, min_keep=cfg.min_keep, official_quirks=cfg.official_quirks)


def uses_fused_attention(device: torch.device, precision: str) -> bool:
    """Fused SDPA for the trained encoder and predictor everywhere except CPU bf16 training, where SDPA's backward
    is so slow that plain attention is 1.4-1.7x faster (bench/RESULTS.md)."""
    return not (device.type == "cpu" and precision == "bf16")


def set_training_attention(model: IJepa, device: torch.device, precision: str, fused: bool | None = None) -> None:
    """The attention each part of the training step runs: ``uses_fused_attention`` (or ``fused``) for the encoder
    and predictor, and always fused SDPA for the target encoder. The target pass runs no backward, so the slow CPU
    backward does not apply, and SDPA never builds the [B, heads, N, N] score tensor: 3-4x faster per layer on a
    2-core CPU (bench/RESULTS.md). Same numbers up to rounding."""
    set_fused_attention(model, uses_fused_attention(device, precision) if fused is None else fused)
    set_fused_attention(model.target_encoder, True)


def train(cfg: PretrainConfig) -> IJepa:
    """Run (or resume) pretraining; exports ``<out_dir>/model`` and returns the trained model."""
    rt: Runtime = setup_runtime(cfg.device)
    precision = resolve_precision(rt.device, cfg.precision)
    model_settings = model_config(cfg)  # a bad setting stops the run here, before anything is written
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    state, resumed_from = resume_state(ckpt_dir, cfg, rt.world_size)

    # model and optimizer
    torch.manual_seed(cfg.seed)
    model = IJepa(model_settings, rescale_residuals=cfg.rescale_residual_init).to(rt.device)
    use_cuda = rt.device.type == "cuda"
    set_training_attention(model, rt.device, precision)
    optimizer = fused_adamw(param_groups([model.encoder, model.predictor]), cfg.lr, cfg.weight_decay)
    start_step, resumed_seconds, saved_data = 0, 0.0, None
    if state is not None:
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])
        start_step, resumed_seconds = state["step"], state.get("elapsed_s", 0.0)
        # before 2026-12-07 emoji runs stored their catalog's fingerprint only in the model's settings
        saved_data = state.get("data_fingerprint") or state.get("model_config", {}).get("data_fingerprint")
        del state  # the optimizer and weights hold their own copies now
        if rt.is_main:
            logger.info("resumed from %s at step %d", resumed_from, start_step)
    online = [p for p in model.encoder.parameters() if p.requires_grad]
    target = [p for p, q in zip(model.target_encoder.parameters(), model.encoder.parameters()) if q.requires_grad]
    encoder, predictor = model.encoder, model.predictor
    target_pass = TargetFeatures(model.target_encoder, model.config.target_norm, model.config.target_layers)
    if rt.distributed:
        ids = [rt.local_rank] if use_cuda else None
        encoder, predictor = DDP(encoder, device_ids=ids), DDP(predictor, device_ids=ids)
    if cfg.compile:
        encoder, predictor, target_pass = (torch.compile(m) for m in (encoder, predictor, target_pass))

    # data: global sample indices per step; images and masks built in workers
    scene = {name: getattr(cfg, name) for name in SCENE_FIELDS} if cfg.data == "emoji" else {}
    dataset = build_dataset(cfg.data, resolution=cfg.img_size, patch_size=cfg.patch_size, seed=cfg.seed, **scene)
    check_resumed_data(saved_data, dataset, resumed_from)
    collate = MaskCollator(model.config.grid_size, mask_config(cfg), seed=cfg.seed)  # checks the mask settings
    if rt.is_main:  # only now: a resume or setting refused above leaves the run's folder as it was
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    sampler = StepBatches(start_step, cfg.steps, cfg.batch_size, rt.rank, rt.world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                        pin_memory=use_cuda, prefetch_factor=4 if cfg.num_workers else None)

    csv_path = out_dir / "log.csv"
    if rt.is_main:
        start_csv_log(csv_path, "step,loss,target_std,lr,weight_decay,ema,img_per_s,elapsed_s", start_step)
    images_per_step = cfg.batch_size * rt.world_size
    # the held-out emoji kNN every knn_every steps: whether the features learn kinds, which the loss does not show
    knn, knn_path = None, out_dir / "knn.csv"
    if cfg.knn_every and rt.is_main:
        if cfg.data != "emoji":
            logger.warning("knn_every scores the built-in emoji protocol; skipped for %s", cfg.data)
        else:
            knn = HeldOutKnn(model.config, seed=0, device=rt.device)
            start_csv_log(knn_path, ",".join(("step", "images_seen", *HeldOutKnn.FIGURES)), start_step)
            logger.info("held-out kNN group to beat: raw pixels %.1f %%, random init %.1f %%",
                        knn.baselines["raw_pixels"]["knn_group"], knn.baselines["random_init"]["knn_group"])
    progress = tqdm(total=cfg.steps, initial=start_step, disable=not rt.is_main, dynamic_ncols=True, unit="step")
    # elapsed_s counts on from the checkpoint, so the log (and the recipe's stage time) covers the whole run
    run_start = time.perf_counter() - resumed_seconds
    window = LossWindow(rt, ckpt_dir)
    warned_collapse = False
    model.train()

    for step, batch in enumerate(loader, start=start_step):
        lr = learning_rate(step, cfg.steps, cfg.warmup_steps, cfg.start_lr, cfg.lr, cfg.final_lr)
        wd = weight_decay(step, cfg.steps, cfg.weight_decay, cfg.final_weight_decay)
        momentum = ema_momentum(step, cfg.steps, cfg.ema_start, cfg.ema_end)
        set_optimizer_schedule(optimizer, lr, wd)
        # the global RNG per step: nothing in today's step draws from it (no dropout or stochastic depth is
        # configured), but anything that ever does stays exact on resume
        torch.manual_seed(cfg.seed * 1_000_003 + step)

        images = model.normalize(batch["images"].to(rt.device, non_blocking=True))
        context_masks = [m.to(rt.device, non_blocking=True) for m in batch["context_masks"]]
        target_masks = [m.to(rt.device, non_blocking=True) for m in batch["target_masks"]]
        with autocast(rt.device, precision):
            loss = ijepa_loss(encoder, predictor, target_pass, images, context_masks, target_masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema_update(target, online, momentum)

        window.add(loss)
        done = step + 1
        progress.update(1)
        if window.due(done, cfg):
            mean_loss, seconds, steps = window.close(done, model.parameters())  # stops the run on NaN/inf
            img_per_s = steps * images_per_step / seconds
            if rt.is_main:
                with autocast(rt.device, precision):
                    spread = target_spread(target_pass, images).item()
                if spread < COLLAPSED_SPREAD and not warned_collapse:
                    warned_collapse = True
                    logger.warning("step %d: the target features have collapsed (spread %.3f < %.2f): the encoder "
                                   "gives every patch nearly the same vector, so the low loss means nothing. Lower "
                                   "--lr or raise --ema-start (bench/RESULTS.md, 'Semantics').", done, spread,
                                   COLLAPSED_SPREAD)
                progress.set_postfix(loss=f"{mean_loss:.4f}", std=f"{spread:.2f}", lr=f"{lr:.2e}",
                                     img_s=f"{img_per_s:.0f}")
                with open(csv_path, "a") as f:
                    f.write(f"{done},{mean_loss:.6f},{spread:.4f},{lr:.6g},{wd:.6g},{momentum:.6f},{img_per_s:.1f},"
                            f"{time.perf_counter() - run_start:.1f}\n")
        # scored before the checkpoint: a run killed while scoring resumes from the one before and scores again
        if knn is not None and (done % cfg.knn_every == 0 or done == cfg.steps):
            scoring_start = time.perf_counter()
            figures = knn(model)
            window.pause(time.perf_counter() - scoring_start)  # img/s counts training only
            progress.write(f"step {done}: held-out kNN group {figures['knn_group']:.1f} % (pixels "
                           f"{knn.baselines['raw_pixels']['knn_group']:.1f}), subgroup {figures['knn_subgroup']:.1f} %")
            with open(knn_path, "a") as f:
                f.write(f"{done},{done * images_per_step}," + ",".join(f"{figures[k]:.2f}" for k in HeldOutKnn.FIGURES)
                        + "\n")
        if rt.is_main and (done % cfg.ckpt_every == 0 or done == cfg.steps):
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                     "config": config_dict(cfg), "model_config": model_settings.to_dict(),
                     "elapsed_s": time.perf_counter() - run_start, "world_size": rt.world_size,
                     "data_fingerprint": getattr(dataset, "fingerprint", None)}
            save_checkpoint(state, ckpt_dir, done, cfg.keep_last)
    progress.close()

    export_dir = out_dir / "model"
    if rt.is_main:
        # whole or not at all: its config.json tells train.default that pretraining finished
        save_folder_atomic(lambda folder: save_model(model, folder), export_dir)
        plot_loss_curve(csv_path, out_dir / "loss.png")
        if knn is not None:
            plot_knn_curve(knn_path, knn.baselines, out_dir / "knn.png")
        logger.info("exported %s", export_dir)
    if rt.distributed:
        dist.barrier()
    teardown_runtime(rt)
    return model


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    train(parse_config(PretrainConfig, argv, description=doc_summary(__doc__)))


if __name__ == "__main__":
    raise SystemExit(run_command(main, interrupted=RESUME_HINT))
