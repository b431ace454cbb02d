"""The built-in default model, end to end, in one command:

    python -m train.default --out-dir runs/default                 # GPU if present, else the CPU recipe
    python -m train.default --out-dir runs/default --profile cpu   # force the CPU recipe (fits 90 min here)
    python -m train.default --out-dir runs/default --budget-minutes 0   # the profile's full lengths, however long
    python -m train.default --out-dir runs/default --export assets # also replace the shipped assets
    python -m train.default --out-dir runs/try --num-workers 8 --pretrain.steps 9000 --decoder.lr 2e-4

Extra flags are the training scripts' own, routed by `route_flags`. Stages (each resumable: a finished stage is
skipped when its output exists; a finished training stage must have the settings asked for now, and no stage's
outputs may outlive a model that is trained again):
  0. the budget: a few real steps of pretraining and of a decoder are timed, and every training stage is shortened
     by one fraction if the profile's full lengths would not fit --budget-minutes here (train/budget.py); before
     the decoders start, their length is refitted to the time the stages before them really left
  1. pretraining on emoji scenes (train/configs/emoji_<profile>.yaml)
  2. evaluation: kNN / linear probe vs raw pixels and random init, predictor semantics, box probes
  3. the reference bank of training-scene boxes for the app's nearest-neighbour panel
  4. two decoders on the frozen model: ours (spatial + context) and the paper-faithful one (pooled only)
  5. decoder evaluation (re-encode retrieval, diversity) for both in one run
  6. the bundle, <out-dir>/bundle (python app.py --assets <out-dir>/bundle): fp16 safetensors + configs, probes,
     bank, example images with boxes, MODEL_CARD.md with the figures; --export swaps it in for a folder, whole or not
     at all, and only if it fits the 60 MB the shipped assets may hold (checked before any stage from the sizes
     the settings give, and again on the files)
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from decoder import SketchDecoder
from ijepa.checkpoint import load_model, save_model
from ijepa.bundle import BANK_NAME, DECODER_DIRS, EXAMPLES_DIR, MODEL_DIR, PROBE_NAMES, SHIPPED_SIZE_LIMIT, folder_bytes
from ijepa.model import IJepa
from train import decoder as decoder_training
from train import budget
from train import eval as evaluation
from train import eval_decoder, pretrain
from train.config import changed_settings, doc_summary, parse_config
from train.examples import choose_examples
from train.runtime import (fast_bf16, logged_training_seconds, save_folder_atomic, write_file_atomic,
                           write_json_atomic)

logger = logging.getLogger("train.default")
CONFIGS = Path(__file__).parent / "configs"

# Stage settings per profile: pretraining config file, decoder/eval sizes, and the wall-clock budget (minutes) the
# training stages are shortened to fit on the machine at hand (train/budget.py; 0: always the full lengths).
# The GPU decoders' last level is 192 wide, not 256: two 64,128,256 decoders (11.5M parameters, 22 MB in fp16 each)
# with the model (11 MB) and the 4096-box bank (14 MB) would be 70 MB, over SHIPPED_SIZE_LIMIT; 64,128,192 keeps
# the two full-resolution levels and makes 7.7M parameters (15 MB) each, 56 MB in all.
PROFILES = {
    "gpu": dict(pretrain="emoji_gpu.yaml", budget_minutes=10, decoder_steps=3000, decoder_batch=128,
                decoder_channels="64,128,192", box_train=4000, box_test=1000, bank=4096, eval_images=256),
    "cpu": dict(pretrain="emoji_cpu.yaml", budget_minutes=90, decoder_steps=500, decoder_batch=32,
                decoder_channels="32,64,128", box_train=2000, box_test=500, bank=2048, eval_images=128),
    "smoke": dict(pretrain="emoji_smoke.yaml", budget_minutes=0, decoder_steps=2, decoder_batch=4,
                  decoder_channels="32,32,32", box_train=64, box_test=32, bank=32, eval_images=64),
}


DECODER_MODES = tuple(DECODER_DIRS)  # the default first
BANK_THUMB = 32  # side in px of each reference box's thumbnail in the bank
BUNDLE_DIR = "bundle"  # the finished run's bundle inside --out-dir
# Probes, example images, samples.png, card and configs: ~0.4 MB in the CPU bundle; counted as 1 MB before training
OTHER_FILES_ESTIMATE = 2**20
PREDICTION_NAMES = {"sample": "the clean image (x0)", "v_prediction": "v", "epsilon": "the noise (epsilon)"}
# Below this diversity (mean pairwise RMS in the box, [0, 1] units) the card explains why our sketches look alike:
# the recipe's 500-step CPU decoder measured 0.05, one trained on 3x the images 0.13 (bench/RESULTS.md)
LOW_DIVERSITY = 0.1
STAGE_TIMES = "stage_seconds.json"  # seconds per finished stage, kept across calls
# What each stage leaves behind: a stage whose outputs all exist is skipped.
STAGE_OUTPUTS = {"pretrain": ["pretrain/model/config.json"], "eval": ["eval/results.json"], "bank": ["bank.safetensors"],
                 "decoders": [f"decoder_{mode}/decoder/config.json" for mode in DECODER_MODES],
                 "decoder_eval": ["decoder_eval/results.json"]}


# Extra flags both stages take that mean the same thing in each; any other flag both take must name its stage.
SHARED_FLAGS = ("device", "num_workers", "precision", "log_every")
RECIPE_FLAGS = ("out_dir", "resume", "checkpoint", "conditioning")  # set by the recipe itself
STAGE_CONFIGS = {"pretrain": pretrain.PretrainConfig, "decoder": decoder_training.DecoderTrainConfig}


def route_flags(extra: list[str]) -> dict[str, list[str]]:
    """Split extra command-line flags between pretraining and the decoders: {"pretrain": [...], "decoder": [...]}.

    ``--pretrain.lr 5e-4`` or ``--decoder.steps 800`` name their stage; an unprefixed flag goes to the one stage
    that has it (``--ema-start``, ``--block-out-channels``), or to both for SHARED_FLAGS (``--num-workers 8``).
    Anything else raises ValueError now, not after the 40 minutes of pretraining that precede the decoders."""
    fields = {stage: {f.name for f in dataclasses.fields(cls)} for stage, cls in STAGE_CONFIGS.items()}
    routed: dict[str, list[str]] = {stage: [] for stage in fields}
    tokens = list(extra)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--"):
            raise ValueError(f"unexpected argument {token!r}: extra settings come as --name value")
        name, has_value, value = token[2:].partition("=")
        if not has_value:
            if not tokens:
                raise ValueError(f"{token} needs a value")
            value = tokens.pop(0)
        stage, _, flag = name.rpartition(".")
        field = flag.replace("-", "_")
        if stage and stage not in fields:
            raise ValueError(f"{token}: name a stage as --pretrain.{flag} or --decoder.{flag}")
        if field in RECIPE_FLAGS:
            raise ValueError(f"--{flag} is set by the recipe itself")
        stages = [stage] if stage else [s for s in fields if field in fields[s]]
        if not stages or any(field not in fields[s] for s in stages):
            raise ValueError(f"unknown setting --{name}; see python -m train.pretrain --help and "
                             "python -m train.decoder --help")
        if len(stages) > 1 and field not in SHARED_FLAGS:
            raise ValueError(f"--{flag} is a setting of both pretraining and the decoders: write --pretrain.{flag} "
                             f"or --decoder.{flag}")
        for s in stages:
            routed[s] += [f"--{field.replace('_', '-')}", value]
    return routed


# What each stage writes, and the stages whose outputs it reads: outputs of a stage whose inputs are about to be
# made again would describe another model, so the recipe refuses to start rather than mix them into one bundle.
STAGE_PATHS = {"pretrain": ["pretrain"], "eval": ["eval"], "bank": ["bank.safetensors", "bank.json"],
               "decoders": [f"decoder_{mode}" for mode in DECODER_MODES], "decoder_eval": ["decoder_eval"]}
STAGE_INPUTS = {"eval": ("pretrain",), "bank": ("pretrain",), "decoders": ("pretrain",),
                "decoder_eval": ("pretrain", "decoders")}


def logged_seconds(out: Path, stage: str) -> float:
    """Training seconds the CSV logs in a stage's folders record (elapsed_s counts on across resumed calls); 0 for
    stages that train nothing."""
    return sum(logged_training_seconds(out / p / "log.csv") for p in STAGE_PATHS[stage])


def stale_stages(out: Path) -> list[str]:
    """Stages with outputs in ``out`` although a stage they read from is unfinished (e.g. its folder was deleted)."""
    return [stage for stage, inputs in STAGE_INPUTS.items()
            if any(not stage_done(out, i) for i in inputs) and any((out / p).exists() for p in STAGE_PATHS[stage])]


def stage_done(out: Path, stage: str) -> bool:
    return all((out / marker).exists() for marker in STAGE_OUTPUTS[stage])


def check_reusable(run_dir: Path, cfg) -> None:
    """A finished training stage is reused only if it ran with the settings asked for now."""
    changes = changed_settings(yaml.safe_load((run_dir / "config.yaml").read_text()) or {}, cfg)
    if changes:
        raise ValueError(f"{run_dir} was trained with other settings ({changes}): choose another --out-dir, or "
                         f"delete {run_dir.parent} to train everything again")


def pretrain_config(profile: dict, run_dir: Path, extra: list[str]) -> pretrain.PretrainConfig:
    resume = ["--resume", "true"] if (run_dir / "checkpoints").exists() else []
    return parse_config(pretrain.PretrainConfig, ["--config", str(CONFIGS / profile["pretrain"]),
                                                  "--out-dir", str(run_dir), *resume, *extra])


def run_pretraining(profile: dict, out: Path, extra: list[str]) -> Path:
    run_dir = out / "pretrain"
    cfg = pretrain_config(profile, run_dir, extra)
    if stage_done(out, "pretrain"):
        check_reusable(run_dir, cfg)
    else:
        pretrain.train(cfg)
    return run_dir / "model"


def run_evaluation(model_dir: Path, profile: dict, out: Path) -> dict:
    results_path = out / "eval" / "results.json"
    if not stage_done(out, "eval"):
        evaluation.main(["--checkpoint", str(model_dir), "--out-dir", str(out / "eval"),
                         "--box-train", str(profile["box_train"]), "--box-test", str(profile["box_test"])])
    return json.loads(results_path.read_text())


@torch.no_grad()
def build_reference_bank(model: IJepa, count: int, path: Path, thumb: int = BANK_THUMB, seed: int = 4242) -> None:
    """Pooled TRUE features of boxes on training scenes + a thumbnail of each box + its subgroup."""
    from train.emoji import get_catalog

    boxes = evaluation.sample_box_features(model, "train", count, seed=seed, keep_images=True,
                                           device=str(next(model.parameters()).device))
    patch = model.config.patch_size
    thumbs = []
    for image, (r0, c0, rows, cols) in zip(boxes.images, boxes.boxes.tolist()):
        crop = image[:, r0 * patch:(r0 + rows) * patch, c0 * patch:(c0 + cols) * patch]
        thumbs.append(F.interpolate(crop[None], size=(thumb, thumb), mode="bilinear", align_corners=False)[0])
    thumbnails = (torch.stack(thumbs).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    catalog = get_catalog()
    write_json_atomic(path.with_suffix(".json"), {"labels": catalog.subgroup_names, "catalog": catalog.fingerprint,
                                                  "features": "pooled true box features"})
    tensors = {"features": boxes.true.half().contiguous(), "thumbnails": thumbnails,
               "subgroup": boxes.subgroup.contiguous()}
    # the .safetensors marks the stage finished (STAGE_OUTPUTS): written last, whole or not at all
    write_file_atomic(path.with_suffix(".safetensors"), lambda tmp: save_file(tensors, tmp))


def decoder_config(model_dir: Path, profile: dict, run_dir: Path, mode: str,
                   extra: list[str]) -> decoder_training.DecoderTrainConfig:
    resume = ["--resume", "true"] if (run_dir / "checkpoints").exists() else []
    steps = profile["decoder_steps"]
    return parse_config(decoder_training.DecoderTrainConfig, [
        "--checkpoint", str(model_dir), "--out-dir", str(run_dir), "--conditioning", mode,
        "--steps", str(steps), "--batch-size", str(profile["decoder_batch"]),
        "--block-out-channels", profile["decoder_channels"], "--warmup-steps", str(max(1, steps // 20)),
        "--sample-every", str(max(1, steps // 4)), "--ckpt-every", str(max(1, steps // 4)), *resume, *extra])


def run_decoders(model_dir: Path, profile: dict, out: Path, extra: list[str]) -> dict[str, Path]:
    paths = {}
    for mode in DECODER_MODES:
        run_dir = out / f"decoder_{mode}"
        cfg = decoder_config(model_dir, profile, run_dir, mode, extra)
        if (run_dir / "decoder" / "config.json").exists():
            check_reusable(run_dir, cfg)
        else:
            decoder_training.train(cfg)
        paths[mode] = run_dir / "decoder"
    return paths


def fit_to_budget(profile: dict, out: Path, flags: dict[str, list[str]], budget_minutes: float | None) -> dict | None:
    """Shorten the profile's training stages to fit ``budget_minutes`` on this machine (train/budget.py).

    Without ``budget_minutes`` a run planned earlier keeps its plan and a new one takes the profile's budget.
    Returns the plan (None without a budget) and rewrites ``profile`` and ``flags`` in place; flags given on the
    command line still win over the plan."""
    planned = (out / budget.PLAN_NAME).exists()
    if budget_minutes is None and not planned:
        budget_minutes = profile["budget_minutes"]
    if not planned and (not budget_minutes or (out / "pretrain").exists()):
        return None  # no budget, or a run started without one: it keeps the lengths it started with

    def make(budget_s: float) -> dict:
        base = pretrain_config(profile, out / "pretrain", flags["pretrain"])
        timings = budget.time_steps(
            base, lambda model_dir, run_dir: decoder_config(model_dir, profile, run_dir, DECODER_MODES[0],
                                                            flags["decoder"]), out / "timing")
        return budget.plan_lengths(budget_s, timings, base.steps, base.warmup_steps, profile["decoder_steps"],
                                   len(DECODER_MODES))

    plan = budget.load_or_make_plan(out, budget_minutes, make)
    flags["pretrain"][:0] = ["--steps", str(plan["pretrain_steps"]), "--warmup-steps",
                             str(plan["pretrain_warmup_steps"])]
    profile["decoder_steps"] = plan["decoder_steps"]
    return plan


def refit_to_budget(plan: dict | None, profile: dict, full_steps: int, out: Path, flags: dict[str, list[str]],
                    spent_s: float) -> dict | None:
    """Refit the decoders' length to the time left after ``spent_s`` seconds (train/budget.py), unless there is no
    plan, a decoder has started (its length is fixed), or ``--decoder.steps`` was given; rewrites ``profile``."""
    if not plan or "--steps" in flags["decoder"] or any((out / p).exists() for p in STAGE_PATHS["decoders"]):
        return plan
    plan = budget.refit_decoders(out, plan, spent_s, full_steps, len(DECODER_MODES))
    profile["decoder_steps"] = plan["decoder_steps"]
    return plan


def run_decoder_eval(model_dir: Path, decoders: dict[str, Path], profile: dict, out: Path) -> dict:
    results_path = out / "decoder_eval" / "results.json"
    if not stage_done(out, "decoder_eval"):
        eval_decoder.main(["--checkpoint", str(model_dir), "--decoder", str(decoders["spatial_context"]),
                           "--paper-decoder", str(decoders["pooled"]), "--num-images", str(profile["eval_images"]),
                           "--out-dir", str(out / "decoder_eval")])
    return json.loads(results_path.read_text())


def write_bundle(folder: Path, out: Path, model_dir: Path, decoders: dict[str, Path], summary: dict) -> None:
    """The app's bundle layout in ``folder``: fp16 weights + configs, probes, bank, examples, metrics, model card."""
    folder.mkdir(parents=True)
    model = load_model(model_dir)
    save_model(model, folder / MODEL_DIR, dtype=torch.float16)
    for mode, name in DECODER_DIRS.items():
        # low_cpu_mem_usage=False: the same loading path with or without accelerate installed
        decoder = SketchDecoder.from_pretrained(decoders[mode], torch_dtype=torch.float16, low_cpu_mem_usage=False)
        decoder.save_pretrained(folder / name)
    for suffix in (".safetensors", ".json"):
        for name in PROBE_NAMES:
            shutil.copy(out / "eval" / f"probe_{name}{suffix}", folder / f"probe_{name}{suffix}")
        shutil.copy(out / f"bank{suffix}", folder / f"{BANK_NAME}{suffix}")
    summary = {**summary, "examples": choose_examples(folder, folder / EXAMPLES_DIR)}
    shutil.copy(out / "decoder_eval" / "samples.png", folder / "samples.png")
    write_json_atomic(folder / "metrics.json", summary)
    write_model_card(summary, folder / "MODEL_CARD.md")


def planned_bundle_sizes(profile: dict, out: Path, flags: dict[str, list[str]]) -> dict[str, int]:
    """Bytes the bundle's parts will take (fp16 weights, uint8 thumbnails), from the settings alone: known before any
    training, so that a bundle too large to ship is refused at the start and not after the whole recipe."""
    model = IJepa(pretrain.model_config(pretrain_config(profile, out / "pretrain", flags["pretrain"])))
    sizes = {MODEL_DIR: 2 * sum(p.numel() for p in model.parameters())}
    for mode, name in DECODER_DIRS.items():
        cfg = decoder_config(out / "pretrain" / "model", profile, out / f"decoder_{mode}", mode, flags["decoder"])
        sizes[name] = 2 * sum(p.numel() for p in decoder_training.build_decoder(cfg, model).parameters())
    sizes[BANK_NAME] = profile["bank"] * (3 * BANK_THUMB**2 + 2 * model.config.embed_dim + 8)
    sizes["other files (estimate)"] = OTHER_FILES_ESTIMATE
    return sizes


def check_bundle_size(sizes: dict[str, int], what: str) -> None:
    """ValueError naming the largest parts if ``sizes`` add up to more than the shipped assets may hold."""
    total = sum(sizes.values())
    if total > SHIPPED_SIZE_LIMIT:
        largest_first = sorted(sizes.items(), key=lambda kv: -kv[1])
        parts = ", ".join(f"{name} {size / 2**20:.1f} MB" for name, size in largest_first)
        raise ValueError(f"{what} is {total / 2**20:.1f} MB, over the {SHIPPED_SIZE_LIMIT / 2**20:.0f} MB the shipped "
                         f"assets may hold ({parts}). Train smaller decoders (--decoder.block-out-channels), or "
                         f"leave out --export and run the app on the run's own bundle: "
                         f"python app.py --assets <out-dir>/{BUNDLE_DIR}")


def export_bundle(bundle: Path, target: Path) -> None:
    """Swap the run's bundle in for ``target``, whole or not at all; ``target`` is left untouched if the bundle is
    over the size limit or if it holds anything a bundle does not (``--export ~/Desktop`` must not empty a desktop)."""
    check_bundle_size({p.name: folder_bytes(p) for p in bundle.iterdir()}, f"the bundle in {bundle}")
    if target.exists():
        if not target.is_dir():
            raise ValueError(f"{target} is a file: --export names the folder the bundle goes to (nothing changed)")
        foreign = sorted(p.name for p in target.iterdir() if not (bundle / p.name).exists())
        if foreign:
            raise ValueError(f"{target} holds {', '.join(foreign)}, which the bundle does not: --export replaces a "
                             "whole folder, so give it a new folder or an earlier bundle (nothing changed)")
    save_folder_atomic(lambda staged: shutil.copytree(bundle, staged), target)


def _pct(x: float) -> str:
    return f"{x:.1f} %"


def object_gap(feats: dict, objects: dict, floor: float) -> str:
    """Where the kNN floor's points are missing, from the object-only diagnostic: in the object features, or in
    what the background adds to the average (the probe's background carries no label)."""
    if "target_encoder" not in objects:
        return ""
    whole, obj = (round(f["target_encoder"]["knn_group"], 1) for f in (feats, objects))
    return (f" Where the points are missing (the object-only diagnostic above): the floor asks for {_pct(floor)} on "
            f"the whole image; pooled over the emoji's own patches the encoder gives {_pct(obj)} (random init "
            f"{_pct(objects['random_init']['knn_group'])}, raw pixels {_pct(objects['raw_pixels']['knn_group'])}), "
            f"and the background costs the whole-image average {obj - whole:.1f} points more. On the CPU, with the "
            "earlier scenes, length cut that cost (22 points at 57,600 images, 4 at 422,400) while the object-only figure stayed at 43-49 % "
            "up to 576,000 images (bench/RESULTS.md, \"Semantics\"), so past it the floor needs object features "
            "that tell unseen emoji apart better than their pixels do, which no I-JEPA run here has shown (the "
            "supervised reference's do: 56.4 % object-only).")


def decoder_run(config: dict) -> str:
    steps, batch = config.get("steps", 0), config.get("batch_size", 0)
    return f"{steps * batch:,} images ({steps} steps x batch {batch})"


def decoder_lead(summary: dict) -> tuple[float, str]:
    """Our decoder's retrieval lead over the paper-faithful one when both were trained as long (the recipe's own
    evaluation, kept when a longer decoder replaced ours), and a line giving those figures if they are not the
    table's."""
    scores = list(summary.get("recipe_decoders", summary["decoders"])["decoders"].values())
    if len(scores) < 2:
        return float("nan"), ""
    ours, paper = scores[0], scores[-1]
    lead = ours["retrieval_top1"] - paper["retrieval_top1"]
    if "recipe_decoders" not in summary:
        return lead, ""
    return lead, (f"\nAt the recipe's length, both decoders trained on "
                  f"{decoder_run(summary['recipe_decoder_config'])} and scored the same way when the bundle was "
                  f"exported: retrieval top-1 {ours['retrieval_top1']:.1f} % (ours) vs {paper['retrieval_top1']:.1f} % "
                  f"(paper), diversity {ours['diversity_rms']:.3f} vs {paper['diversity_rms']:.3f}.\n")


def retrained_note(summary: dict) -> str:
    """How our decoder was trained again, longer, after the recipe (train/replace_decoder.py)."""
    retrained = summary.get("decoder_retrained")
    if not retrained:
        return ""
    seconds = f"{retrained['train_seconds']:.0f} s of training, " if retrained.get("train_seconds") else ""
    return (f"- Then ours was trained again on this bundle's frozen model, longer: "
            f"{decoder_run(summary['decoder_config'])}, `{retrained['command']}` ({retrained['hardware']}, "
            f"{retrained['date']}; {seconds}{retrained['eval_seconds']:.0f} s to score both decoders), and swapped "
            f"in with `{retrained['replaced_by']}`. The paper-faithful decoder is the recipe's; the table below "
            "scores the bundle's two decoders as shipped.\n")


def knn_curve(csv_path: Path) -> list[dict]:
    """The held-out kNN rows pretraining logged (``--knn-every``), or none."""
    if not csv_path.exists():
        return []
    with open(csv_path) as f:
        return [{"images_seen": int(row["images_seen"]), "knn_group": float(row["knn_group"]),
                 "object_knn_group": float(row["object_knn_group"])} for row in csv.DictReader(f)]


def examples_note(summary: dict) -> str:
    """How the example images were chosen, from what choose_examples returned (bundles before it recorded none)."""
    chosen = summary.get("examples")
    if not chosen or not chosen["scanned"]:
        return ""
    right, scanned, shown = chosen["read_right"], chosen["scanned"], chosen["shown"]
    shortfall = "" if right >= shown else f", and {shown - right} it reads wrong fill the gallery"
    return (f"- Examples (`examples/`, the app's gallery, `python -m train.examples`): held-out scenes with a box over "
            f"the top half of the main emoji, chosen where the group probe reads the hidden emoji's group from the "
            f"predictor's output (the app's readout). Of the {scanned} scenes looked at, it did in {right} "
            f"({100 * right / scanned:.0f} %){shortfall}. So they show what the predictor gets right, not how often: "
            f"that is the \"probe on predicted features\" column below.\n")


def write_model_card(summary: dict, path: Path, command: str | None = None) -> None:
    """MODEL_CARD.md from the measured summary: every figure in it comes from this run's JSON (the command too,
    unless given)."""
    command = command or summary["command"]
    feats = summary["features"]["features"]
    rows = "\n".join(f"| {name} | {_pct(m['knn_group'])} | {_pct(m['knn_subgroup'])} | {_pct(m['linear_group'])} | "
                     f"{_pct(m['linear_subgroup'])} |" for name, m in feats.items())
    sem = summary["features"].get("predictor_semantics", {})
    sem_rows = "\n".join(f"| {name} | {_pct(m['true_acc'])} | {_pct(m['predicted_acc'])} | {m['ratio']:.2f} |"
                         for name, m in sem.items())
    dec = summary["decoders"]["decoders"]
    unet_precision = summary["decoders"].get("precision", "fp32")  # bundles evaluated before bf16 say none
    dec_rows = "\n".join(f"| {name} | {m['retrieval_top1']:.1f} % (chance {m['chance_top1']:.1f} %, "
                         + (f"a grey box {m['grey_box_top1']:.1f} %, " if "grey_box_top1" in m else "")
                         + f"{m['gallery']} candidates) | {m['reencode_cosine']:.3f} | {m['diversity_rms']:.3f} | "
                         f"{m['max_context_change_8bit']:.0f} |" for name, m in dec.items())
    best_pixels = max(feats["raw_pixels"]["knn_group"], feats["random_init"]["knn_group"])
    margin = feats["target_encoder"]["knn_group"] - best_pixels
    ratio = sem.get("heldout_emoji_group", {}).get("ratio", float("nan"))
    dec_lead, lead_note = decoder_lead(summary)
    objects = summary["features"].get("object_patches_only", {})
    object_rows = "\n".join(f"| {name} | {_pct(m['knn_group'])} | {_pct(m['knn_subgroup'])} |"
                             for name, m in objects.items())
    object_note = "" if not objects else f"""
Diagnostic (not the protocol): the same kNN with features pooled over the emoji's own patches only (pixels
outside them blanked). The gap between this table and the one above is what the background costs the average.

| features | kNN group | kNN subgroup |
|---|---|---|
{object_rows}
"""
    curve = summary.get("knn_during_pretraining") or []
    curve_note = "" if not curve else (
        "During pretraining (`--knn-every`, the same protocol, `pretrain/knn.csv`), kNN group by images seen: "
        + ", ".join(f"{row['images_seen']:,}: {row['knn_group']:.1f} %" for row in curve) + ".\n")
    pretrain_cfg, decoder_cfg = summary.get("pretrain_config", {}), summary.get("decoder_config", {})
    images_seen = pretrain_cfg.get("steps", 0) * pretrain_cfg.get("batch_size", 0)
    gap_note = "" if margin >= 15 else (
        f"What would close the kNN gap (this run saw {images_seen:,} images) is not known yet, but it is not the "
        "encoder's size or the world: this encoder trained with cross-entropy on the main emoji's group, on 422,400 "
        "scenes of the CPU recipe's earlier world (before the still life), scores 55.8 %, 17.4 points above raw "
        "pixels (`python bench/supervised_reference.py`, bench/RESULTS.md, \"What do labels buy\"). So features "
        "that clear the floor exist for this model on this world, and the I-JEPA objective has not found them at "
        "this length. Single runs do not pin a recipe down: at 422,400 images four seeds of the earlier scenes "
        "scored 34.2-41.6 % kNN group and three of the still life 38.0-43.0 % (bench/RESULTS.md, \"How much of it "
        "is the seed?\" and \"Does co-occurrence teach kinds\"), and the official recipe only matched pixels "
        "after 688k images. Next to measure: the GPU profile "
        "(`train/configs/emoji_gpu.yaml`: the same model on ~2M images in minutes, logging this kNN every 1000 "
        "steps) with several seeds, and wider encoders at that length, each judged by `python -m train.eval` (at "
        "96,000 images a 384-wide encoder scored 2.5 points below the 192-wide one, bench/RESULTS.md, "
        "\"Semantics\")."
        + object_gap(feats, objects, best_pixels + 15) + "\n")
    grid = pretrain_cfg.get("img_size", 0) // max(1, pretrain_cfg.get("patch_size", 1))
    grid_note = "" if grid >= 16 else (
        f"- Patch grid {grid} x {grid}, coarser than the 16 x 16 the default-model issue asks for, so boxes snap to "
        f"{pretrain_cfg.get('patch_size')} px cells. Why (measured on the project's 2-core CPU, bench/RESULTS.md, "
        "\"Semantics\"): a 16 x 16 grid cost 3.9x more per image there and collapsed with this lr and EMA.\n")
    theme_note = "" if not pretrain_cfg.get("theme_prob") else (
        f"- Themed scenes: each distractor shares the main emoji's Unicode {pretrain_cfg.get('theme')} with "
        f"probability {pretrain_cfg['theme_prob']:g}, so what is visible says what kind of emoji is hidden (photos "
        "have such co-occurrence: a plate holds food). The loss never sees a label, but the world is built from the "
        "taxonomy the probes score, so read the kNN figures as what that co-occurrence teaches (bench/RESULTS.md, "
        "\"Semantics\").\n")
    layers = pretrain_cfg.get("target_layers", 1)
    target_note = "" if pretrain_cfg.get("target_norm", "layer") == "layer" else (
        "- Targets: data2vec's, not the paper's. Each feature of the target encoder's "
        + (f"last {layers} blocks" if layers > 1 else "last block") + " is normalised over the image's tokens"
        + (" and the blocks are averaged" if layers > 1 else "") + " before the paper's per-token LayerNorm, so what "
        "every patch of an image shares (its background) is not worth predicting. The objective is still I-JEPA's: "
        "predict the target encoder's features of hidden blocks from the visible context. At 96,000 images this "
        "target gained 7.2 points of group kNN over the paper's; at the CPU recipe's length it scored within noise "
        "of it, and a probe on true box features read less (bench/RESULTS.md, \"Does what the predictor predicts "
        "matter?\"). The official weights keep the paper's target.\n")
    ours = next(iter(dec.values()))
    x0_note = "" if decoder_cfg.get("prediction_type") != "sample" or ours["diversity_rms"] >= LOW_DIVERSITY else (
        "The decoders predict the clean image and saw few images, so they draw close to their average guess: "
        "blurry, and nearly the same picture for every seed (low diversity); a v-prediction decoder trained this "
        "briefly draws noise instead. Length, not the design, is what limits this: on the shipped CPU model our "
        "decoder trained on 3x the images drew more detail and more variety, and was more faithful too "
        "(bench/RESULTS.md, \"Decoder length\"). To get such a decoder "
        "(~65 min on a 2-core CPU): `python -m train.decoder --checkpoint assets/model --steps 1500 --batch-size 32 "
        "--block-out-channels 32,64,128 --warmup-steps 75 --out-dir runs/decoder_long`, then `python -m "
        "train.replace_decoder --bundle assets --run runs/decoder_long` swaps it into the bundle and rewrites this "
        "card (or try it first: `python app.py --decoder runs/decoder_long/decoder --decoder assets/decoder_paper`).\n")
    recipe_cfg = summary.get("recipe_decoder_config", decoder_cfg)  # what the recipe itself trained both with
    plan, decoder_steps = summary.get("plan") or {}, recipe_cfg["steps"]
    decoders_run = f"the decoders took {decoder_steps} steps each"
    if "planned_decoder_steps" in plan:
        decoders_run = (f"the decoders, refitted to the time left after {plan['spent_before_decoders_s']:.0f} s of "
                        f"pretraining, evaluation and bank, took {decoder_steps} steps each (planned "
                        f"{plan['planned_decoder_steps']})")
    plan_note = "" if not plan else (
        f"- Budget: {plan['budget_s'] / 60:g} minutes. Timed at the start on this machine: "
        f"{plan['pretrain_step_s']:.2f} s per pretraining step, {plan['decoder_step_s']:.2f} s per decoder step "
        f"(timing {plan['timing_s']:.0f} s, counted in the total), so pretraining ran at "
        f"{100 * plan['fraction']:.0f} % of the profile's length; {decoders_run} (train/budget.py).\n")
    card = f"""# Model card: the built-in default I-JEPA (emoji world)

Generated by `train/default.py` from the run's own measurements ({summary['date']}); do not edit figures by hand.

## What it is
- An I-JEPA ({pretrain_cfg.get('arch', '?')}, depth {pretrain_cfg.get('depth') or 'default'}, patch
  {pretrain_cfg.get('patch_size', '?')}, {pretrain_cfg.get('img_size', '?')} px; predictor
  {pretrain_cfg.get('predictor_depth', '?')} x {pretrain_cfg.get('predictor_embed_dim', '?')}) pretrained with this
  project's pipeline on **emoji scenes** (Noto Color Emoji composed on varied backgrounds), plus two sketch decoders
  (ours: spatial predicted tokens + visible context; paper-faithful: pooled predicted tokens only), a linear probe
  on true box features (Unicode subgroups and groups) and a reference bank of training-scene boxes.
{grid_note}{theme_note}{target_note}{examples_note(summary)}- Files: `model/` (encoder, target encoder, predictor; fp16 safetensors + config.json), `decoder/`,
  `decoder_paper/`, `probe_*.{{safetensors,json}}`, `bank.{{safetensors,json}}`, `examples/`, `metrics.json`.

## How it was made
- Command: `{command}`
- Profile: {summary['profile']}; hardware: {summary['hardware']}; torch {summary['torch']}.
- Pretraining: {pretrain_cfg.get('steps', '?')} steps x batch {pretrain_cfg.get('batch_size', '?')} =
  {images_seen:,} images seen.
- Decoders: {decoder_run(recipe_cfg)} each, predicting
  {PREDICTION_NAMES.get(recipe_cfg.get('prediction_type'), '?')}; the pretrained model stays frozen.
{plan_note}- Wall time per stage (s): {json.dumps(summary['stage_seconds'])}; total {summary['total_seconds']:.0f} s.
{retrained_note(summary)}
## Evaluation (held-out emoji, `python -m train.eval`)
Bank: every training base emoji, queries: every held-out base emoji (2 copies each); kNN k=20, cosine,
temperature 0.07; linear probe on the bank. Labels: Unicode group (9) and subgroup.

| features | kNN group | kNN subgroup | linear group | linear subgroup |
|---|---|---|---|---|
{rows}

Target-encoder kNN (group) minus the better of raw pixels and random init: **{margin:+.1f} points** (floor: +15).
{curve_note}{object_note}
Predictor semantics: a probe trained on TRUE box features, applied to the PREDICTOR's outputs for the same boxes.

| boxes | probe on true features | probe on predicted features | ratio |
|---|---|---|---|
{sem_rows}

Held-out-emoji group ratio: **{ratio:.2f}** (floor: 0.6).

## Decoders (`python -m train.eval_decoder`, held-out emoji scenes, same boxes and seeds, UNet in {unet_precision})

| decoder | re-encode retrieval top-1 | re-encode cosine | diversity (RMS, box) | max context change (8-bit) |
|---|---|---|---|---|
{dec_rows}
{lead_note}
Sample sketches: `samples.png` (rows: input with the box, then each decoder's sketches).
Reading the retrieval column: the sketch is re-encoded in its context, so part of "ours" lead comes from the
context it sees and the paper-faithful decoder never does; that is the point of the design, but it is not a
statement about the box pixels alone. The surroundings alone, with the box filled grey, are the retrieval's real
floor where it is given ("a grey box"), far above uniform chance. Diversity is the mean pairwise RMS distance inside
the box, in [0, 1] units.
{x0_note}
## Floors (from the default-model issue)
- kNN group at least 15 points above raw pixels and random init: {"met" if margin >= 15 else "**not met**"} ({margin:+.1f}).
- Predictor-probe ratio at least 0.6 (held-out emoji, group): {"met" if ratio >= 0.6 else "**not met**"} ({ratio:.2f}).
- Decoder retrieval clearly above the paper-faithful mode, both trained as long: {"met" if dec_lead > 10 else "**not met**"} ({dec_lead:+.1f} points).

{gap_note}
## Limits
- An emoji-world model is not a photo model: its features describe emoji on flat backgrounds. For photos, load the
  official weights (`python app.py --checkpoint IN1K-vit.h.14-300e.pth.tar`) and train a decoder for them
  (`python -m train.decoder --checkpoint IN1K-vit.h.14-300e.pth.tar --data /path/to/images`).
- The decoders were trained on one box at a time. With several boxes, each box's sketch is drawn with the other
  boxes blanked in its surroundings, an input they never saw in training: read multi-box sketches with care.
- Small and briefly trained: see the figures above against the floors before reading much into any one sketch.

## Attribution
Emoji images: Noto Color Emoji (Apache-2.0). Labels: Unicode emoji-test.txt. See NOTICE.
"""
    path.write_text(card)


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        name = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model_name = next((l.split(":", 1)[1].strip() for l in name.splitlines() if l.startswith("Model name")), "")
    except OSError:
        model_name = platform.processor()
    bf16 = "native bf16" if fast_bf16(torch.device("cpu")) else "no native bf16, so fp32"
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{model_name or 'CPU'} ({torch.get_num_threads()} threads, {capability}, {bf16})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=doc_summary(__doc__),
        epilog="Any other --name value sets a training stage's setting: --pretrain.lr 5e-4 or --decoder.steps 800 name "
               "their stage, a name only one stage has needs no prefix (--ema-start 0.995); python -m train.pretrain "
               "--help and python -m train.decoder --help list them.")
    parser.add_argument("--out-dir", default="runs/default")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None, help="default: gpu if CUDA, else cpu")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="shorten the training stages to fit this wall-clock budget on this machine, timed at "
                             "the start (default: the plan of an earlier call with this --out-dir, else the "
                             "profile's: 90 for cpu, 10 for gpu; 0: the full lengths)")
    parser.add_argument("--export", default=None,
                        help="replace this folder (e.g. assets) with the run's bundle, whole, if it fits the 60 MB "
                             "the shipped assets may hold; the bundle is always in <out-dir>/bundle")
    args, extra = parser.parse_known_args(argv)  # other flags go to the training stages: see route_flags
    try:
        flags = route_flags(extra)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    profile_name = args.profile or ("gpu" if torch.cuda.is_available() else "cpu")
    profile, out = dict(PROFILES[profile_name]), Path(args.out_dir)
    if args.export:
        check_bundle_size(planned_bundle_sizes(profile, out, flags), "the bundle these settings make")
    stale = stale_stages(out)
    if stale:
        raise ValueError(f"{out} holds outputs of {', '.join(stale)} made from a model or decoder this call would "
                         f"train again: choose another --out-dir, or delete {out} to train everything again")
    out.mkdir(parents=True, exist_ok=True)
    # A stage whose output exists is skipped; the card then reports the time it took when it ran. Each stage's time
    # is written as soon as it ends, so a call stopped later (the device's per-call limit) keeps the times of the
    # stages it finished.
    times_path = out / STAGE_TIMES
    timings = json.loads(times_path.read_text()) if times_path.exists() else {}
    finished = {stage: stage_done(out, stage) for stage in STAGE_OUTPUTS}

    def timed(stage, fn, *a):
        t = time.perf_counter()
        result = fn(*a)
        if not (finished[stage] and stage in timings):
            # A stage resumed in this call (after a kill, or the device's per-call limit) also counts the training
            # time its logs carry from earlier calls.
            timings[stage] = round(max(time.perf_counter() - t, logged_seconds(out, stage)), 1)
            write_json_atomic(times_path, timings)
        logger.info("stage %s: %.0f s", stage, timings[stage])
        return result

    def reference_bank(model_dir: Path) -> None:
        if not finished["bank"]:
            model = load_model(model_dir).to("cuda" if torch.cuda.is_available() else "cpu")
            build_reference_bank(model, profile["bank"], out / "bank")

    if not all(finished.values()):
        shutil.rmtree(out / BUNDLE_DIR, ignore_errors=True)  # a bundle stands for a finished run only
    plan = fit_to_budget(profile, out, flags, args.budget_minutes)
    model_dir = timed("pretrain", run_pretraining, profile, out, flags["pretrain"])
    features = timed("eval", run_evaluation, model_dir, profile, out)
    timed("bank", reference_bank, model_dir)
    plan = refit_to_budget(plan, profile, PROFILES[profile_name]["decoder_steps"], out, flags,
                           sum(timings[stage] for stage in ("pretrain", "eval", "bank")))
    decoders = timed("decoders", run_decoders, model_dir, profile, out, flags["decoder"])
    sketches = timed("decoder_eval", run_decoder_eval, model_dir, decoders, profile, out)
    summary = {"profile": profile_name, "hardware": hardware(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "stage_seconds": timings,
               "total_seconds": round(sum(timings.values()) + (plan["timing_s"] if plan else 0.0), 1),
               "plan": plan, "features": features, "decoders": sketches,
               "knn_during_pretraining": knn_curve(model_dir.parent / "knn.csv"),
               "pretrain_config": yaml.safe_load((model_dir.parent / "config.yaml").read_text()),
               "decoder_config": yaml.safe_load((decoders["spatial_context"].parent / "config.yaml").read_text()),
               "command": "python -m train.default " + " ".join(argv if argv is not None else sys.argv[1:])}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    save_folder_atomic(lambda folder: write_bundle(folder, out, model_dir, decoders, summary), out / BUNDLE_DIR)
    logger.info("the app runs on this model with: python app.py --assets %s", out / BUNDLE_DIR)
    if args.export:
        export_bundle(out / BUNDLE_DIR, Path(args.export))
        logger.info("exported the bundle to %s", args.export)


if __name__ == "__main__":
    main()
