"""Pretraining throughput of the real I-JEPA training step: images/s, step time, peak memory and MFU.

    python bench/pretrain_throughput.py                                  # CUDA if present: all three models
    python bench/pretrain_throughput.py --device cpu --models vit_tiny --batch 32 --compile
    python bench/pretrain_throughput.py --json --only ours               # one JSON line per measurement

What is timed is the step ``train/pretrain.py`` runs, built from the same functions (imported, not copied):
schedules + ``set_optimizer_schedule``, ``IJepa.normalize``, ``train.runtime.autocast``, ``ijepa_loss``,
``zero_grad`` / ``backward`` / AdamW step (``fused_adamw`` over ``param_groups``), ``ema_update``.
Images are random and resident on the device; masks use the official config (4 targets, scale .15-.2, aspect
.75-1.5, context .85-1.0) and are pre-generated outside the timed region, one distinct set per step (the real loop
builds them in DataLoader workers, so mask lengths vary from step to step as in training). ``--warmup`` steps run
first, then ``--steps`` steps are timed between two device synchronisations.

Variants (all measured in the same run, on the same device):
  ours            the training step as above, in the precision ``train/pretrain.py`` picks (``--precision``,
                  default auto: bf16 autocast where bf16 is native, fp32 on CPUs without it), with the attention
                  ``train/pretrain.py`` picks (``set_training_attention``): fused SDPA for the target pass (no
                  backward), and for encoder and predictor timm's fused SDPA except plain attention for CPU bf16
                  (there SDPA's backward is several times slower than plain bf16 matmuls).
  ours+compile    the same with ``torch.compile`` of encoder, predictor and target pass (``--compile``),
                  as ``train/pretrain.py --compile true`` does.
  ours+sdpa / ours+plain-attn
                  the same with the encoder and predictor attention ``train/pretrain.py`` does NOT pick
                  (``--other-attention``; the target pass stays fused), to
                  re-check that choice on new hardware or torch versions (with ``--compile``: also compiled).
  reference       what the official train step does around the same loss: plain (unfused) attention on every timm
                  block, the predictor's last block run on every row (ours runs it on the query rows only:
                  ``last_block_queries_only``), AdamW built with torch's defaults as the official ``init_opt``
                  builds it (foreach on CUDA, a per-parameter loop on CPU), on CUDA with bf16 a GradScaler (scale,
                  step, update: the official code keeps it for bf16), the gradient norm of every encoder weight
                  matrix read back to the host (its ``grad_logger``, every step), the EMA as a per-parameter Python
                  loop, no compile, and the loss read back every step (the step returns ``float(loss)``). bf16
                  autocast on CUDA; fp32 on CPU, because the official CUDA autocast does nothing on a CPU
                  (``--reference-precision``). Not modelled: the DDP wrapper the official code puts on even a single
                  GPU.

Analytic FLOPs per image (matmuls only, multiply-add = 2 FLOPs; norms, softmax, GELU, gathers, optimizer ignored).
A transformer layer of width d, MLP ratio r, on a sequence of n tokens costs
    layer(n, d) = 2 n d^2 (3 + 1 + 2 r)      # qkv, proj, fc1 + fc2
                + 2 * 2 n^2 d                # q k^T and attn @ v
With N = all patches, Kc / Kt = context / target tokens per mask (each timed step counted with its own masks),
T = number of target blocks, P = patch_size, D / Dp = encoder / predictor width, L / Lp = their depths:
    target encoder   (forward only)     F_t = 2 N (3 P^2) D + L * layer(N, D)
    context encoder  (forward+backward) F_c = 2 * 2 N (3 P^2) D + 3 * L * layer(Kc, D)
                                        (patch embed on all N; its backward is the weight gradient alone)
    predictor        (forward+backward) F_p = 3 * [2 Kc D Dp + T * (Lp * layer(Kc + Kt, Dp) + 2 Kt Dp D)]
    FLOPs/image = F_t + F_c + F_p         (backward = 2x forward, hence 3x forward for forward+backward)
These are the official step's FLOPs for every variant, so MFU is proportional to images/s: ours, which leaves out
the context rows of the predictor's last block (2.5 % of the work for vit_tiny), shows that as a higher MFU.
MFU = achieved FLOP/s / the bf16 matmul peak measured in the same run (CUDA: 8192^3, CPU: 2048^3). On CPU the fp32
matmul peak is reported as well, and fp32 variants also get their MFU against it (they are bounded by that peak).
On a CPU without native bf16 (no AVX512-BF16 or AMX) bf16 matmuls are emulated, so no bf16 peak is measured unless
a variant runs in bf16, and MFU is against the fp32 peak (``mfu_basis`` in the JSON says which).

Peak memory: CUDA ``max_memory_allocated`` over the timed steps; CPU: the process's resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs before the timed steps), so it includes Python and the libraries. The
mark cannot be reset below what the process holds, which on a CPU includes what earlier variants of the run freed
and the allocator kept: ``held_mem_gib`` is that level, so compare variants by ``peak - held`` or run one alone
(``--only``). ``graphs_compiled_while_timed`` counts torch.compile graphs captured during the timed steps (a
warning says to raise ``--warmup`` when it is not 0).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the checkout

from ijepa.masks import MaskConfig, MultiBlockMaskGenerator  # noqa: E402
from ijepa.model import IJepa, IJepaConfig  # noqa: E402
from ijepa.vision_transformer import set_fused_attention  # noqa: E402
from train.config import doc_summary  # noqa: E402
from train.objective import (TargetFeatures, ema_momentum, ema_update, ijepa_loss,  # noqa: E402
                             learning_rate, param_groups, set_optimizer_schedule, weight_decay)
from train.pretrain import set_training_attention, uses_fused_attention  # noqa: E402
from ijepa.device import PRECISIONS, fast_bf16, process_status, resolve_device, resolve_precision  # noqa: E402
from train.runtime import LossWindow, Runtime, autocast, fused_adamw  # noqa: E402

logger = logging.getLogger("bench.pretrain_throughput")

# Official optimisation recipe (train/pretrain.py defaults); the schedules run so the step does the same work.
LR, START_LR, FINAL_LR, WARMUP_STEPS, TOTAL_STEPS = 1e-3, 2e-4, 1e-6, 200, 2000
WD, FINAL_WD, EMA_START, EMA_END = 0.04, 0.4, 0.996, 1.0


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    patch_size: int
    img_size: int
    predictor_embed_dim: int
    predictor_depth: int
    cuda_batch: int
    cpu_batch: int

    def config(self) -> IJepaConfig:
        return IJepaConfig.from_arch(self.arch, img_size=self.img_size, patch_size=self.patch_size,
                                     predictor_embed_dim=self.predictor_embed_dim,
                                     predictor_depth=self.predictor_depth)


MODELS: dict[str, ModelSpec] = {
    "vit_tiny": ModelSpec("vit_tiny", 4, 64, 96, 6, cuda_batch=256, cpu_batch=32),
    "vit_small": ModelSpec("vit_small", 16, 224, 384, 6, cuda_batch=128, cpu_batch=8),
    "vit_base": ModelSpec("vit_base", 16, 224, 384, 6, cuda_batch=128, cpu_batch=8),
    "vit_huge": ModelSpec("vit_huge", 14, 224, 384, 12, cuda_batch=128, cpu_batch=2),
}


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str  # "bf16" or "fp32"
    fused_attn: bool | None = None  # encoder and predictor; None: as train/pretrain.py chooses
    compile: bool = False
    official_step: bool = False  # the official train step around the loss (module docstring, "reference")


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs and hardware peak
# ---------------------------------------------------------------------------------------------------------------------

def layer_flops(tokens: float, width: int, mlp_ratio: float) -> float:
    """Matmul FLOPs of one transformer layer on one sequence: linears 2 n d^2 (4 + 2 r), attention 2 * 2 n^2 d."""
    return 2 * tokens * width**2 * (4 + 2 * mlp_ratio) + 2 * 2 * tokens**2 * width


def flops_per_image(config: IJepaConfig, context_len: float, target_len: float, num_targets: int) -> float:
    """Analytic training FLOPs per image (formula in the module docstring)."""
    n = config.grid_size[0] * config.grid_size[1]
    d, dp, r = config.embed_dim, config.predictor_embed_dim, config.mlp_ratio
    patch_embed = 2 * n * (3 * config.patch_size**2) * d
    target = patch_embed + config.depth * layer_flops(n, d, r)
    context = 2 * patch_embed + 3 * config.depth * layer_flops(context_len, d, r)  # images need no gradient
    per_block = (config.predictor_depth * layer_flops(context_len + target_len, dp, config.predictor_mlp_ratio)
                 + 2 * target_len * dp * d)
    predictor = 3 * (2 * context_len * d * dp + num_targets * per_block)
    return target + context + predictor


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int, min_seconds: float = 1.0) -> float:
    """Best-of-several throughput of a square matmul: the practical peak that MFU is measured against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    best, spent = 0.0, 0.0
    while spent < min_seconds:
        start = time.perf_counter()
        reps = 5
        for _ in range(reps):
            a @ b
        synchronize(device)
        elapsed = time.perf_counter() - start
        spent += elapsed
        best = max(best, 2 * size**3 * reps / elapsed / 1e12)
    return best


# ---------------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------------

def _process_memory_gib(field: str) -> float | None:
    """VmRSS (resident now) or VmHWM (its high-water mark) of this process in GiB; None where Linux does not say."""
    shown = process_status(field)  # e.g. "2548736 kB"
    return None if shown is None else int(shown.split()[0]) / 2**20


def held_memory_gib(device: torch.device) -> float | None:
    """What the process holds as the timed steps start. On a CPU the high-water mark cannot be reset below it, and
    it includes what earlier variants freed but the allocator kept, so a variant's own peak is only comparable
    within a run as ``peak - held``, or alone (``--only``)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    return _process_memory_gib("VmRSS")


def compiled_graphs() -> int:
    """Graphs torch.compile has captured in this process: a rise inside the timed steps means compile time was
    timed (mask lengths change from step to step, and each new length compiles once before dynamic shapes)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the resident-set high-water mark to the current RSS


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return _process_memory_gib("VmHWM")


# ---------------------------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------------------------

def pregenerate_masks(config: IJepaConfig, batch: int, count: int, seed: int, pin: bool):
    """``count`` distinct mask sets with the official config, like the DataLoader workers would deliver them."""
    generator = torch.Generator().manual_seed(seed)
    sampler = MultiBlockMaskGenerator(config.grid_size, MaskConfig())
    sets = []
    for _ in range(count):
        context, targets = sampler(batch, generator)
        if pin:
            context, targets = [m.pin_memory() for m in context], [m.pin_memory() for m in targets]
        sets.append((context, targets))
    return sets


def build_step(spec: ModelSpec, variant: Variant, device: torch.device, batch: int,
               mask_sets: list) -> tuple[Callable[[int], None], IJepa]:
    """The training step of train/pretrain.py (or the reference flavour of it) as a closure over step index."""
    torch.manual_seed(0)
    model = IJepa(spec.config()).to(device)
    model.train()
    use_cuda = device.type == "cuda"
    if variant.official_step:  # plain attention in every block (the target pass too), AdamW as init_opt builds it:
        set_fused_attention(model, False)  # four groups (decayed and not, of encoder and of predictor), each its own
        groups = [*param_groups([model.encoder]), *param_groups([model.predictor])]  # foreach call on CUDA
        model.predictor.last_block_queries_only = False  # every row through the last block too
        optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), weight_decay=WD)
    else:  # exactly as train/pretrain.py builds them
        set_training_attention(model, device, variant.precision, variant.fused_attn)
        optimizer = fused_adamw(param_groups([model.encoder, model.predictor]), LR, WD)
    online = [p for p in model.encoder.parameters() if p.requires_grad]
    target = [p for p, q in zip(model.target_encoder.parameters(), model.encoder.parameters()) if q.requires_grad]
    encoder, predictor, target_pass = model.encoder, model.predictor, TargetFeatures(model.target_encoder)
    if variant.compile:
        encoder, predictor, target_pass = (torch.compile(m) for m in (encoder, predictor, target_pass))
    official_scaler = variant.official_step and use_cuda and variant.precision == "bf16"  # kept for bf16, as official
    scaler = torch.amp.GradScaler("cuda") if official_scaler else None
    raw_images = torch.rand(batch, 3, spec.img_size, spec.img_size, device=device)
    window = LossWindow(Runtime(device=device), Path("checkpoints"))  # the real loop's loss bookkeeping

    def ema(momentum: float) -> None:
        if not variant.official_step:
            ema_update(target, online, momentum)
            return
        with torch.no_grad():
            for q, k in zip(online, target):
                k.mul_(momentum).add_((1.0 - momentum) * q)

    def step(i: int) -> None:
        lr = learning_rate(i, TOTAL_STEPS, WARMUP_STEPS, START_LR, LR, FINAL_LR)
        wd = weight_decay(i, TOTAL_STEPS, WD, FINAL_WD)
        momentum = ema_momentum(i, TOTAL_STEPS, EMA_START, EMA_END)
        set_optimizer_schedule(optimizer, lr, wd)
        torch.manual_seed(i)
        context_cpu, target_cpu = mask_sets[i]
        images = model.normalize(raw_images)
        context_masks = [m.to(device, non_blocking=True) for m in context_cpu]
        target_masks = [m.to(device, non_blocking=True) for m in target_cpu]
        with autocast(device, variant.precision):
            loss = ijepa_loss(encoder, predictor, target_pass, images, context_masks, target_masks)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if variant.official_step:  # the official grad_logger: one host read per encoder weight matrix
            for name, p in model.encoder.named_parameters():
                if p.grad is not None and not (name.endswith(".bias") or p.dim() == 1):
                    float(p.grad.norm())
        ema(momentum)
        if variant.official_step:
            loss.item()
        window.add(loss)  # read back only every log_every steps, as in the real loop

    return step, model


def measure(spec_name: str, variant: Variant, device: torch.device, batch: int, warmup: int, steps: int,
            peaks: dict[str, float], mfu_basis: str) -> dict:
    """One variant's measurement; MFU against ``peaks[mfu_basis]``."""
    spec = MODELS[spec_name]
    config = spec.config()
    mask_sets = pregenerate_masks(config, batch, warmup + steps, seed=0, pin=device.type == "cuda")
    step, model = build_step(spec, variant, device, batch, mask_sets)
    for i in range(warmup):
        step(i)
    synchronize(device)
    reset_peak_memory(device)
    held_mem, graphs = held_memory_gib(device), compiled_graphs()
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    synchronize(device)
    elapsed = time.perf_counter() - start
    peak_mem, graphs = peak_memory_gib(device), compiled_graphs() - graphs
    if graphs:
        logger.warning("%s %s: %d graph(s) compiled during the timed steps, so compile time is in the figures: "
                       "raise --warmup", spec_name, variant.name, graphs)

    timed = mask_sets[warmup:]
    flops = sum(flops_per_image(config, ctx[0].size(1), tgt[0].size(1), len(tgt)) for ctx, tgt in timed) * batch
    tflops = flops / elapsed / 1e12
    result = {
        "model": spec_name, "patch": spec.patch_size, "img_size": spec.img_size,
        "predictor": f"{spec.predictor_depth}x{spec.predictor_embed_dim}", "device": device.type,
        "device_name": device_name(device), "variant": variant.name, "precision": variant.precision,
        "batch": batch, "img_per_s": round(batch * steps / elapsed, 2), "step_ms": round(1e3 * elapsed / steps, 2),
        "peak_mem_gib": None if peak_mem is None else round(peak_mem, 3),
        "held_mem_gib": None if held_mem is None else round(held_mem, 3), "graphs_compiled_while_timed": graphs,
        "tflops": round(tflops, 4),
        "gflop_per_img": round(flops / (batch * steps) / 1e9, 3), "mfu": round(tflops / peaks[mfu_basis], 4),
        "mfu_basis": mfu_basis, "peak_tflops_bf16": round(peaks["bf16"], 4) if "bf16" in peaks else None,
        "mean_context_tokens": round(sum(c[0].size(1) for c, _ in timed) / steps, 1),
        "mean_target_tokens": round(sum(t[0].size(1) for _, t in timed) / steps, 1),
        "warmup": warmup, "steps": steps, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if "fp32" in peaks:
        result["peak_tflops_fp32"] = round(peaks["fp32"], 4)
        if variant.precision == "fp32" and mfu_basis == "bf16":  # cannot use the bf16 peak: how close to its own?
            result["mfu_vs_fp32_peak"] = round(tflops / peaks["fp32"], 4)
    del step, model, mask_sets
    torch._dynamo.reset()  # first: compiled graphs hold the model, which must be freed before the next variant
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cpus)"
    return platform.processor() or "cpu"


def variants(args: argparse.Namespace, device: torch.device) -> list[Variant]:
    chosen = []
    if args.only in (None, "ours"):
        precision = resolve_precision(device, args.precision)
        chosen.append(Variant("ours", precision))
        if args.compile:
            chosen.append(Variant("ours+compile", precision, compile=True))
        if args.other_attention:
            fused = not uses_fused_attention(device, precision)
            name = "ours+sdpa" if fused else "ours+plain-attn"
            chosen.append(Variant(name, precision, fused_attn=fused))
            if args.compile:
                chosen.append(Variant(f"{name}+compile", precision, fused_attn=fused, compile=True))
    if args.only in (None, "reference"):
        precision = args.reference_precision
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        chosen.append(Variant("reference", precision, fused_attn=False, official_step=True))
    return chosen


def format_table(rows: list[dict]) -> str:
    header = ("model", "variant", "prec", "batch", "img/s", "step ms", "peak GiB", "TFLOP/s", "MFU")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in rows:
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        mfu = f"{100 * r['mfu']:.1f} %"
        if "mfu_vs_fp32_peak" in r:
            mfu += f" (fp32 peak: {100 * r['mfu_vs_fp32_peak']:.1f} %)"
        lines.append(" | ".join([r["model"], r["variant"], r["precision"], str(r["batch"]), f"{r['img_per_s']:.1f}",
                                 f"{r['step_ms']:.1f}", mem, f"{r['tflops']:.3f}", mfu]))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc_summary(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cuda, cuda:N or cpu")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated, from {', '.join(MODELS)} "
                             "(default: vit_tiny,vit_base,vit_huge on CUDA, vit_tiny on CPU)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size for every model (default: 256/128/128 on CUDA, 32 for vit_tiny on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 CUDA, 3 CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 CUDA, 8 CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--only", choices=("ours", "reference"), default=None,
                        help="measure one variant family (default: both)")
    parser.add_argument("--compile", action="store_true",
                        help="also measure ours with torch.compile (on a 2-core CPU the first, uncached compile "
                             "takes minutes; it happens in the warm-up steps)")
    parser.add_argument("--other-attention", action="store_true",
                        help="also measure ours with the encoder and predictor attention train/pretrain.py does "
                             "not pick here (fused SDPA for CPU bf16, plain attention elsewhere; the target pass "
                             "stays fused)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="autocast for ours (auto: bf16 where it is native, else fp32, as train/pretrain.py)")
    parser.add_argument("--reference-precision", choices=PRECISIONS, default="auto",
                        help="auto: bf16 on CUDA, fp32 on CPU (how the official code runs there)")
    parser.add_argument("--json", action="store_true", help="one JSON line per measurement instead of a table")
    args = parser.parse_args(argv)
    if args.models is not None:
        args.models = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in args.models if m not in MODELS]
        if unknown or not args.models:
            parser.error(f"unknown model(s) {unknown or args.models}; choose from {', '.join(MODELS)}")
    for name in ("batch", "warmup", "steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be {'>= 0' if name == 'warmup' else '>= 1'}, got {value}")
    return args


def main(argv=None) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = parse_args(argv)
    device = torch.device(resolve_device(args.device))
    if device.type not in ("cpu", "cuda"):  # only these two are synchronised around the timed steps
        raise SystemExit(f"error: --device {args.device}: the benchmark times cpu or cuda only")
    cuda = device.type == "cuda"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models = args.models or (["vit_tiny", "vit_base", "vit_huge"] if cuda else ["vit_tiny"])
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 3)
    steps = args.steps if args.steps is not None else (20 if cuda else 8)

    chosen = variants(args, device)
    mfu_basis = "bf16" if fast_bf16(device) else "fp32"  # an emulated bf16 peak would be no yardstick
    peaks = {}
    if mfu_basis == "bf16" or any(v.precision == "bf16" for v in chosen):
        peaks["bf16"] = matmul_peak_tflops(device, torch.bfloat16, 8192 if cuda else 2048)
    if not cuda or mfu_basis == "fp32":
        peaks["fp32"] = matmul_peak_tflops(device, torch.float32, 8192 if cuda else 2048)
    logger.info("%s, torch %s, %d threads; matmul peak: %s", device_name(device), torch.__version__,
                torch.get_num_threads(), ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in peaks.items()))

    rows, failed = [], []
    # every eager variant of every model first, compiled ones last: a run stopped by a time limit (the device
    # script's) keeps the figures the goals are judged on, and loses only the optional compiled rows
    for model_name, variant in [(m, v) for compiled in (False, True) for m in models for v in chosen
                                if v.compile == compiled]:
        spec = MODELS[model_name]
        batch = args.batch or (spec.cuda_batch if cuda else spec.cpu_batch)
        logger.info("measuring %s %s (batch %d, %d warm-up + %d timed steps)", model_name, variant.name, batch,
                    warmup, steps)
        try:
            row = measure(model_name, variant, device, batch, warmup, steps, peaks, mfu_basis)
        except Exception as err:  # noqa: BLE001 - recorded as a row and in the exit status; the others still run
            logger.exception("%s %s failed", model_name, variant.name)
            failed.append(f"{model_name} {variant.name}: {type(err).__name__}: {err}")
            if args.json:
                print(json.dumps({"model": model_name, "variant": variant.name, "error": failed[-1]}), flush=True)
            continue
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(format_table(rows))
    if failed:
        raise SystemExit("failed measurements:\n" + "\n".join(failed))
    return rows


if __name__ == "__main__":
    main()
