"""The built-in default model, end to end, in one command: pretraining, evaluation, reference bank, two sketch
decoders and their evaluation, then the bundle the app runs on.

    python -m train.default --out-dir runs/default                 # GPU if present, else the CPU recipe
    python -m train.default --out-dir runs/default --profile cpu   # force the CPU recipe (fits 90 min here)
    python -m train.default --out-dir runs/default --budget-minutes 0   # the profile's full lengths, however long
    python -m train.default --out-dir runs/default --export assets # also replace the shipped assets
    python -m train.default --out-dir runs/try --num-workers 8 --pretrain.steps 9000 --decoder.lr 2e-4 \
        --budget-minutes 0                                       # lengths given on the command line, unplanned

Extra flags are the training scripts' own, routed by `route_flags`. Stages (each resumable: a finished stage is
skipped when its output exists; a finished training stage must have the settings asked for now, and no stage's
outputs may outlive a model that is trained again; before any stage runs, what the finished ones left is read, and
a damaged file is made again, never trained again unasked: `repair_finished_stages`):
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
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Collection

import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors import SafetensorError

from decoder import SketchDecoder
from ijepa.bundle import (BANK_NAME, DECODER_DIRS, EXAMPLES_DIR, METRICS_NAME, MODEL_CARD_NAME, MODEL_DIR,
                          PROBE_NAMES, SHIPPED_SIZE_LIMIT, folder_bytes, load_bank, load_probe)
from ijepa.checkpoint import RECIPE_BUNDLE_DIR, CheckpointError, load_model, save_model, save_safetensors
from ijepa.device import resolve_device
from ijepa.model import IJepa
from train import decoder as decoder_training
from train import budget
from train import eval as evaluation
from train import eval_decoder, pretrain
from train.config import changed_settings, doc_summary, parse_config, run_command
from train.examples import choose_examples
from train.export_checkpoint import model_from_checkpoint
from train.model_card import write_model_card
from train.runtime import (code_version, hardware, list_checkpoints, logged_training_seconds, newest_readable,
                           read_json, save_folder_atomic, swap_leftover_of, write_file_atomic, write_json_atomic)

logger = logging.getLogger("train.default")
CONFIGS = Path(__file__).parent / "configs"

# Stage settings per profile: pretraining config file, decoder/eval sizes, and the wall-clock budget (minutes) the
# training stages are shortened to fit on the machine at hand (train/budget.py; 0: always the full lengths). The GPU
# decoders render their scenes with as many workers as pretraining (~320 scenes/s per process on a CPU core: one
# worker would hold a batch of 128 to ~2.5 steps/s).
# The GPU decoders' last level is 192 wide, not 256: two 64,128,256 decoders (11.5M parameters, 22 MB in fp16 each)
# with the model (11 MB) and the 4096-box bank (14 MB) would be 70 MB, over SHIPPED_SIZE_LIMIT; 64,128,192 keeps
# the two full-resolution levels and makes 7.7M parameters (15 MB) each, 56 MB in all.
PROFILES = {
    "gpu": dict(pretrain="emoji_gpu.yaml", budget_minutes=10, decoder_steps=3000, decoder_batch=128,
                decoder_channels="64,128,192", decoder_workers=14, box_train=4000, box_test=1000, bank=4096,
                eval_images=256),
    "cpu": dict(pretrain="emoji_cpu.yaml", budget_minutes=90, decoder_steps=500, decoder_batch=32,
                decoder_channels="32,64,128", decoder_workers=1, box_train=2000, box_test=500, bank=2048,
                eval_images=128),
    "smoke": dict(pretrain="emoji_smoke.yaml", budget_minutes=0, decoder_steps=2, decoder_batch=4,
                  decoder_channels="32,32,32", decoder_workers=1, box_train=64, box_test=32, bank=32, eval_images=64),
}


DECODER_MODES = tuple(DECODER_DIRS)  # the default first
BANK_THUMB = 32  # side in px of each reference box's thumbnail in the bank
BUNDLE_DIR = RECIPE_BUNDLE_DIR  # the finished run's bundle inside --out-dir
# Probes, example images, samples.png, card and configs: ~0.4 MB in the CPU bundle; counted as 1 MB before training
OTHER_FILES_ESTIMATE = 2**20
STAGE_TIMES = "stage_seconds.json"  # seconds per finished stage, kept across calls
STAGE_MACHINES = "stage_hardware.json"  # the machine each stage ran on (calls may run on different machines)
PROFILE_FILE = "profile.json"  # the profile and command a run was started with: later calls go on with the profile
# What each stage leaves behind: a stage whose outputs all exist is skipped.
STAGE_OUTPUTS = {"pretrain": ["pretrain/model/config.json"], "eval": ["eval/results.json"],
                 "bank": ["bank.safetensors"],
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


def started_code(started: dict, current: str | None = None) -> str:
    """The commit a run started from (``run_started_with``): this call's (``current``, else asked of git) for a new
    run; for a run started by a version that did not record it, unknown, not this call's, which may be another."""
    if started:
        return started.get("code", "unknown (started by an older version)")
    return current if current is not None else code_version()


def run_started_with(out: Path) -> dict:
    """What the run in ``out`` was started with: {"profile", "command", "code"} from PROFILE_FILE; a run from before
    that file has only its profile, in summary.json; a new run, nothing."""
    if (out / PROFILE_FILE).is_file():
        return read_run_json(out / PROFILE_FILE)
    if (out / "summary.json").is_file():
        return {"profile": read_run_json(out / "summary.json").get("profile")}
    return {}


def choose_profile(out: Path, recorded: str | None, asked: str | None) -> str:
    """The profile the run in ``out`` was started with if it has one (a run started on a GPU machine goes on with the
    gpu profile anywhere), else ``asked``, else gpu where CUDA is, else cpu. Asking for another profile than the
    run's is refused, since every stage would differ."""
    if recorded and asked and asked != recorded:
        raise ValueError(f"{out} is a run of the {recorded} profile: pass --profile {recorded} (or no --profile) to "
                         f"go on with it, or choose another --out-dir for a {asked} run")
    return recorded or asked or ("gpu" if torch.cuda.is_available() else "cpu")


def stages_hardware(machines: dict[str, str]) -> str:
    """The machine the stages ran on, or each stage's where calls ran on different machines."""
    distinct = set(machines.values())
    if len(distinct) > 1:
        return "; ".join(f"{stage}: {machine}" for stage, machine in machines.items())
    return distinct.pop() if distinct else hardware()


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


def read_run_json(path: Path):
    """A JSON file of the run's own bookkeeping or results (``read_json``)."""
    return read_json(path, "this run wrote it, so delete it and run the same command again to write it anew")


def retrain_advice(out: Path, run_dir: Path) -> str:
    """What to delete so that the next call trains the stage in ``run_dir`` again: with it go the outputs of the
    stages that read from it, which would otherwise be refused as another model's."""
    if run_dir == out / "pretrain":
        return f"delete {out} to train everything again"
    return f"delete {run_dir} and {out / 'decoder_eval'} to train this decoder again"


def recorded_settings(run_dir: Path, advice: str) -> dict:
    """The settings a training stage ran with, as its newest checkpoint records them beside the weights, or where no
    checkpoint is left, as its config.yaml does. Checkpoint first: a config.yaml cut short can still parse, with
    settings missing. ``advice``: what to do when neither can be read (``retrain_advice``)."""
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    try:
        state = newest_readable(checkpoints, mmap=True)[0] if checkpoints else {}  # its settings: no tensor read
    except CheckpointError:
        state = {}
    if isinstance(state.get("config"), dict):
        return state["config"]
    try:
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        recorded = None
    if not isinstance(recorded, dict):
        raise ValueError(f"{run_dir / 'config.yaml'} is damaged or missing and no checkpoint in "
                         f"{run_dir / 'checkpoints'} records the settings instead, so the recipe cannot tell whether "
                         f"this stage may be reused: {advice}")
    return recorded


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def unreadable_decoder(folder: Path) -> Exception | None:
    """Why a decoder export cannot be read (cut short, not safetensors, weights that do not fit its config), or None.
    Only damage: whether it fits the model is the settings checks' question, asked later."""
    try:
        SketchDecoder.load_checked(folder)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        return err
    return None


def repair_finished_stages(out: Path) -> None:
    """Read what every finished stage left before any stage runs, so that a file damaged since (a disk that filled
    up, a copy cut short) is found now and never reaches the bundle.

    What is computed, not trained (the evaluation, the bank, the decoder evaluation) is done again. A training
    stage's export is written again from its run's last checkpoint: the model directly, a decoder by resuming its
    run there (which only exports), after which the decoder evaluation is done again. Without a checkpoint to write
    it from, the recipe stops and says what to delete; it never trains anything again unasked. Files that read
    fine are left alone, whatever model they belong to: that is for the settings checks of each stage."""
    model_dir = out / "pretrain" / "model"
    if not stage_done(out, "pretrain"):
        return
    try:
        model = load_model(model_dir)
    except (CheckpointError, ValueError, OSError) as err:
        model = reexport_model(out, err)
    dim = model.config.embed_dim
    computed = {
        "eval": lambda: [read_run_json(out / "eval" / "results.json"),
                         *(load_probe(out / "eval" / f"probe_{name}.safetensors", dim) for name in PROBE_NAMES)],
        "bank": lambda: load_bank(out / f"{BANK_NAME}.safetensors", dim),
        "decoder_eval": lambda: [read_run_json(out / "decoder_eval" / "results.json"),
                                 Image.open(out / "decoder_eval" / "samples.png").load()],
    }
    redo: dict[str, str] = {}  # stage -> why its outputs are made again
    for mode in DECODER_MODES:
        run_dir = out / f"decoder_{mode}"
        damage = unreadable_decoder(run_dir / "decoder") if (run_dir / "decoder" / "config.json").exists() else None
        if damage is None:
            continue
        if not list_checkpoints(run_dir / "checkpoints"):
            raise ValueError(f"{run_dir / 'decoder'} cannot be read ({damage}), and no checkpoint is left in "
                             f"{run_dir / 'checkpoints'} to export it again from: "
                             f"{retrain_advice(out, run_dir)}") from None
        logger.warning("%s cannot be read (%s): it is exported again from its run's last checkpoint",
                       run_dir / "decoder", damage)
        shutil.rmtree(run_dir / "decoder")
        redo["decoder_eval"] = "a decoder it evaluated is exported again"
    for stage, read in computed.items():
        if stage in redo or not stage_done(out, stage):
            continue
        try:
            read()
        except (FileNotFoundError, ValueError, OSError) as err:
            redo[stage] = str(err)
    for stage, reason in redo.items():
        logger.warning("%s: the %s stage is done again", reason, stage)
        for path in STAGE_PATHS[stage]:
            remove(out / path)


def reexport_model(out: Path, err: Exception) -> IJepa:
    """The finished pretraining's model, written again from its last checkpoint (the step it was exported at)."""
    run_dir = out / "pretrain"
    model_dir = run_dir / "model"
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if checkpoints:  # only the newest can be the finished step's
        try:
            model, step, settings = model_from_checkpoint(checkpoints[-1])
            if step == settings.steps:
                logger.warning("%s cannot be read (%s): it is written again from %s", model_dir, err, checkpoints[-1])
                save_folder_atomic(lambda folder: save_model(model, folder), model_dir)
                return model
        except (CheckpointError, ValueError, OSError) as reason:
            logger.warning("no checkpoint to write %s again from: %s", model_dir, reason)
    advice = retrain_advice(out, run_dir)
    steps = recorded_settings(run_dir, advice).get("steps")
    raise ValueError(f"{model_dir} cannot be read ({err}), and no checkpoint of the finished run (step {steps}) "
                     f"is left in {run_dir / 'checkpoints'} to write it again from: {advice}") from None


def check_reusable(run_dir: Path, cfg) -> None:
    """A finished training stage is reused only if it ran with the settings asked for now."""
    changes = changed_settings(recorded_settings(run_dir, retrain_advice(run_dir.parent, run_dir)), cfg)
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
        evaluation.evaluate_checkpoint(model_dir, out / "eval", box_train=profile["box_train"],
                                       box_test=profile["box_test"])
    return read_run_json(results_path)


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
                                                  "features": "pooled true box features",
                                                  "model_signature": model.feature_signature()})
    tensors = {"features": boxes.true.half().contiguous(), "thumbnails": thumbnails,
               "subgroup": boxes.subgroup.contiguous()}
    # the .safetensors marks the stage finished (STAGE_OUTPUTS): written last, whole or not at all
    write_file_atomic(path.with_suffix(".safetensors"), lambda tmp: save_safetensors(tensors, tmp))


def run_reference_bank(model_dir: Path, profile: dict, out: Path) -> None:
    if not stage_done(out, "bank"):
        model = load_model(model_dir).to(resolve_device("auto"))
        build_reference_bank(model, profile["bank"], out / "bank")


def decoder_config(model_dir: Path, profile: dict, run_dir: Path, mode: str,
                   extra: list[str]) -> decoder_training.DecoderTrainConfig:
    """The profile's decoder settings; warmup, sample grids and checkpoints follow the length the decoder will
    really have (``--decoder.steps`` included), and flags in ``extra`` win over all of them."""
    resume = ["--resume", "true"] if (run_dir / "checkpoints").exists() else []
    args = ["--checkpoint", str(model_dir), "--out-dir", str(run_dir), "--conditioning", mode,
            "--steps", str(profile["decoder_steps"]), "--batch-size", str(profile["decoder_batch"]),
            "--block-out-channels", profile["decoder_channels"], "--num-workers", str(profile["decoder_workers"]),
            *resume]
    steps = parse_config(decoder_training.DecoderTrainConfig, [*args, *extra]).steps
    derived = ["--warmup-steps", str(max(1, steps // 20)), "--sample-every", str(max(1, steps // 4)),
               "--ckpt-every", str(max(1, steps // 4))]
    return parse_config(decoder_training.DecoderTrainConfig, [*args, *derived, *extra])


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
    explicit = budget_minutes
    if budget_minutes is None and not planned:
        budget_minutes = profile["budget_minutes"]
    if not planned and (not budget_minutes or (out / "pretrain").exists()):
        if explicit and (out / "pretrain").exists():
            logger.warning("%s was started without a budget plan and keeps the lengths it started with: "
                           "--budget-minutes %s does not apply to it", out, explicit)
        return None  # no budget, or a run started without one: it keeps the lengths it started with
    # a plan fitted around other lengths would be overrun, and the card would quote it; a run planned by a version
    # that let --decoder.steps through keeps that length (refit_to_budget leaves it)
    given = [f"--{stage}.steps" for stage in ("pretrain", "decoder")
             if "--steps" in flags[stage] and (stage == "pretrain" or not planned)]
    if given:
        raise ValueError(f"{' and '.join(given)} fix{'es' if len(given) == 1 else ''} a length the budget plan "
                         "sets: add --budget-minutes 0 to run the lengths given, or leave --steps out and let the "
                         "plan fit them")

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
    plan, a decoder has started (its length is fixed), or ``--decoder.steps`` was given (only a run planned by an
    older version: ``fit_to_budget`` refuses it under a new plan); rewrites ``profile``."""
    if not plan or "--steps" in flags["decoder"] or any((out / p).exists() for p in STAGE_PATHS["decoders"]):
        return plan
    plan = budget.refit_decoders(out, plan, spent_s, full_steps, len(DECODER_MODES))
    profile["decoder_steps"] = plan["decoder_steps"]
    return plan


def run_decoder_eval(model_dir: Path, decoders: dict[str, Path], profile: dict, out: Path) -> dict:
    results_path = out / "decoder_eval" / "results.json"
    if not stage_done(out, "decoder_eval"):
        eval_decoder.evaluate_decoders(model_dir, decoders["spatial_context"], decoders["pooled"],
                                       out / "decoder_eval", num_images=profile["eval_images"])
    return read_run_json(results_path)


# What write_bundle puts in a bundle: an --export target holding anything else is refused before the first stage
BUNDLE_NAMES = frozenset({
    MODEL_DIR, *DECODER_DIRS.values(), EXAMPLES_DIR, "samples.png", METRICS_NAME, MODEL_CARD_NAME,
    *(f"{stem}{suffix}" for stem in (*(f"probe_{name}" for name in PROBE_NAMES), BANK_NAME)
      for suffix in (".safetensors", ".json"))})


def write_bundle(folder: Path, out: Path, model_dir: Path, decoders: dict[str, Path], summary: dict) -> None:
    """The app's bundle layout in ``folder``: fp16 weights + configs, probes, bank, examples, metrics, model card."""
    folder.mkdir(parents=True)
    model = load_model(model_dir)
    save_model(model, folder / MODEL_DIR, dtype=torch.float16)
    for mode, name in DECODER_DIRS.items():
        decoder = SketchDecoder.load_checked(decoders[mode], torch_dtype=torch.float16)
        decoder.save_pretrained(folder / name)
    for suffix in (".safetensors", ".json"):
        for name in PROBE_NAMES:
            shutil.copy(out / "eval" / f"probe_{name}{suffix}", folder / f"probe_{name}{suffix}")
        shutil.copy(out / f"bank{suffix}", folder / f"{BANK_NAME}{suffix}")
    summary = {**summary, "examples": choose_examples(folder, folder / EXAMPLES_DIR)}
    shutil.copy(out / "decoder_eval" / "samples.png", folder / "samples.png")
    write_json_atomic(folder / METRICS_NAME, summary)
    write_model_card(summary, folder / MODEL_CARD_NAME)


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


def check_export_target(target: Path, names: Collection[str]) -> None:
    """ValueError unless ``target`` may be replaced by a bundle of these ``names``: a new folder, or one that holds
    nothing else (``--export ~/Desktop`` must not empty a desktop)."""
    if target.exists():
        if not target.is_dir():
            raise ValueError(f"{target} is a file: --export names the folder the bundle goes to (nothing changed)")
        # what a killed save_folder_atomic of a part leaves (train.examples swaps examples/ in place) is ours
        foreign = sorted(p.name for p in target.iterdir()
                         if p.name not in names and swap_leftover_of(p.name) not in names)
        if foreign:
            raise ValueError(f"{target} holds {', '.join(foreign)}, which the bundle does not: --export replaces a "
                             "whole folder, so give it a new folder or an earlier bundle (nothing changed)")


def export_bundle(bundle: Path, target: Path) -> None:
    """Swap the run's bundle in for ``target``, whole or not at all; ``target`` is left untouched if the bundle is
    over the size limit or ``check_export_target`` refuses it."""
    check_bundle_size({p.name: folder_bytes(p) for p in bundle.iterdir()}, f"the bundle in {bundle}")
    check_export_target(target, {p.name for p in bundle.iterdir()})
    save_folder_atomic(lambda staged: shutil.copytree(bundle, staged), target)


class StageClock:
    """Runs the recipe's stages and keeps each one's seconds and machine in ``out``, written as soon as it ends, so a
    call stopped later (the device's per-call limit) keeps the times of the stages it finished. A stage whose output
    existed before this call is skipped by its own function; its recorded time stands, so the card reports the time
    it took when it ran."""

    def __init__(self, out: Path):
        self.out = out
        self.times_path, self.machines_path = out / STAGE_TIMES, out / STAGE_MACHINES
        self.timings = read_run_json(self.times_path) if self.times_path.exists() else {}
        self.machines = read_run_json(self.machines_path) if self.machines_path.exists() else {}
        self.finished = {stage: stage_done(out, stage) for stage in STAGE_OUTPUTS}

    def run(self, stage: str, fn: Callable, *args):
        start = time.perf_counter()
        result = fn(*args)
        if not (self.finished[stage] and stage in self.timings):
            # A stage resumed in this call (after a kill, or the device's per-call limit) also counts the training
            # time its logs carry from earlier calls.
            self.timings[stage] = round(max(time.perf_counter() - start, logged_seconds(self.out, stage)), 1)
            self.machines[stage] = hardware()
            write_json_atomic(self.times_path, self.timings)
            write_json_atomic(self.machines_path, self.machines)
        logger.info("stage %s: %.0f s", stage, self.timings[stage])
        return result


def knn_curve(csv_path: Path) -> list[dict]:
    """The held-out kNN rows pretraining logged (``--knn-every``), or none."""
    if not csv_path.exists():
        return []
    with open(csv_path) as f:
        return [{"images_seen": int(row["images_seen"]), "knn_group": float(row["knn_group"]),
                 "object_knn_group": float(row["object_knn_group"])} for row in csv.DictReader(f)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=doc_summary(__doc__),
        epilog="Any other --name value sets a training stage's setting: --pretrain.lr 5e-4 or --decoder.steps 800 name "
               "their stage, a name only one stage has needs no prefix (--ema-start 0.995); python -m train.pretrain "
               "--help and python -m train.decoder --help list them.")
    parser.add_argument("--out-dir", default="runs/default")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help="default: the run's own in an --out-dir that has one, else gpu if CUDA, else cpu")
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
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: --out-dir names the run's folder (nothing changed)")
    started = run_started_with(out)
    profile_name = choose_profile(out, started.get("profile"), args.profile)
    profile = dict(PROFILES[profile_name])
    if args.export:  # now, not after the recipe's 90 minutes
        check_bundle_size(planned_bundle_sizes(profile, out, flags), "the bundle these settings make")
        check_export_target(Path(args.export), BUNDLE_NAMES)
    repair_finished_stages(out)
    stale = stale_stages(out)
    if stale:
        raise ValueError(f"{out} holds outputs of {', '.join(stale)} made from a model or decoder this call would "
                         f"train again: choose another --out-dir, or delete {out} to train everything again")
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m train.default " + " ".join(argv if argv is not None else sys.argv[1:])
    first_command = started.get("command", command)
    plan = fit_to_budget(profile, out, flags, args.budget_minutes)
    # after the plan: a call it refuses trained nothing, so the card must not quote it as the run's command
    code = code_version()  # the code this call runs: imported at its start
    first_code = started_code(started, code)
    write_json_atomic(out / PROFILE_FILE, {"profile": profile_name, "command": first_command, "code": first_code})
    clock = StageClock(out)
    if not all(clock.finished.values()):
        shutil.rmtree(out / BUNDLE_DIR, ignore_errors=True)  # a bundle stands for a finished run only
    model_dir = clock.run("pretrain", run_pretraining, profile, out, flags["pretrain"])
    features = clock.run("eval", run_evaluation, model_dir, profile, out)
    clock.run("bank", run_reference_bank, model_dir, profile, out)
    plan = refit_to_budget(plan, profile, PROFILES[profile_name]["decoder_steps"], out, flags,
                           sum(clock.timings[stage] for stage in ("pretrain", "eval", "bank")))
    decoders = clock.run("decoders", run_decoders, model_dir, profile, out, flags["decoder"])
    sketches = clock.run("decoder_eval", run_decoder_eval, model_dir, decoders, profile, out)
    timings = clock.timings
    summary = {"profile": profile_name, "hardware": stages_hardware(clock.machines), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "stage_seconds": timings,
               "total_seconds": round(sum(timings.values()) + (plan["timing_s"] if plan else 0.0), 1),
               "plan": plan, "features": features, "decoders": sketches,
               "knn_during_pretraining": knn_curve(model_dir.parent / "knn.csv"),
               "pretrain_config": recorded_settings(model_dir.parent, retrain_advice(out, model_dir.parent)),
               "decoder_config": recorded_settings(decoders["spatial_context"].parent,
                                                   retrain_advice(out, decoders["spatial_context"].parent)),
               "command": first_command if command == first_command else f"{first_command} (then: {command})",
               "code": first_code if code == first_code else f"{first_code} (then: {code})"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    save_folder_atomic(lambda folder: write_bundle(folder, out, model_dir, decoders, summary), out / BUNDLE_DIR)
    logger.info("the app runs on this model with: python app.py --assets %s", out / BUNDLE_DIR)
    if args.export:
        export_bundle(out / BUNDLE_DIR, Path(args.export))
        logger.info("exported the bundle to %s", args.export)


if __name__ == "__main__":
    raise SystemExit(run_command(main, interrupted="the same command again skips finished stages and resumes training"))
