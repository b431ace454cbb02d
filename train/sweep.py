"""Compare pretraining variants in one run: each variant is a short pretraining run (a base config plus its
overrides), scored by the same held-out emoji protocol as `train.eval`; one JSON line per variant.

    python -m train.sweep --config train/configs/emoji_cpu.yaml --variants train/configs/sweep_cpu.yaml \\
        --out-dir runs/sweep --steps 600 --warmup-steps 40

Flags after the known ones (``--steps 600``) override the base config for every variant. Raw pixels and a
random-init encoder are scored once, on the base architecture, and kept with the base settings they were scored for:
a later call into the same folder with another base model or seed is refused. A variant whose line is already in
``results.jsonl`` is skipped and one killed mid-training resumes from its last checkpoint, so an interrupted sweep
continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import fields, replace
from pathlib import Path

import yaml

from ijepa.model import IJepa
from train import eval as evaluation
from train import pretrain
from ijepa.device import resolve_device
from train.config import (RESUME_HINT, changed_settings, config_dict, doc_summary, load_config, parse_config,
                          run_command)
from train.runtime import logged_training_seconds

logger = logging.getLogger("train.sweep")
VARIANT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def load_variants(path: Path) -> dict[str, dict]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--variants {path}: no such file (a YAML mapping of variant name -> config "
                                "overrides, e.g. train/configs/sweep_cpu.yaml)")
    try:
        variants = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(variants, dict) or not all(isinstance(v, dict) or v is None for v in variants.values()):
        raise ValueError(f"{path}: expected a mapping of variant name -> config overrides")
    known = {f.name for f in fields(pretrain.PretrainConfig)}
    for name, overrides in variants.items():
        # each variant trains in <out-dir>/<name>, and "baselines" names the baseline row of results.jsonl
        if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name) or name == "baselines":
            raise ValueError(f"{path}: variant name {name!r}: use letters, digits, '_', '-' and '.', not starting "
                             "with '.', and not 'baselines'")
        unknown = sorted(set(overrides or {}) - known)
        if unknown:
            raise ValueError(f"{path}: variant {name!r} sets unknown config keys {unknown}")
    return {name: dict(overrides or {}) for name, overrides in variants.items()}


def read_results(lines: Path) -> dict[str, dict]:
    """The rows of ``results.jsonl`` by variant; a last line cut short by a kill is dropped (its variant runs again,
    resuming from its checkpoints)."""
    if not lines.exists():
        return {}
    rows, text = {}, lines.read_text().splitlines()
    for number, line in enumerate(text, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number < len(text):
                raise ValueError(f"{lines}: line {number} is not JSON; fix or delete that line") from None
            logger.warning("%s: its last line was cut short (a run stopped while writing it); that variant runs "
                           "again", lines)
            lines.write_text("".join(f"{kept}\n" for kept in text[:-1]))
            continue
        rows[row["variant"]] = row
    return rows


def summary_row(name: str, result: dict) -> str:
    t, objects = result["features"]["target_encoder"], result.get("object_patches_only", {})
    obj = objects.get("target_encoder", {}).get("knn_group", float("nan"))
    return (f"| {name} | {t['knn_group']:.1f} | {t['knn_subgroup']:.1f} | {t['linear_group']:.1f} | "
            f"{result['features'].get('context_encoder', {}).get('knn_group', float('nan')):.1f} | {obj:.1f} | "
            f"{result.get('final_loss', float('nan')):.4f} | {result.get('seconds', 0):.0f} |")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=doc_summary(__doc__),
        epilog="Any other --name value overrides the base config for every variant (--steps 600 --warmup-steps 40); "
               "python -m train.pretrain --help lists the settings.")
    parser.add_argument("--config", required=True, help="the base pretraining YAML")
    parser.add_argument("--variants", required=True, help="YAML: variant name -> overrides of the base config")
    parser.add_argument("--out-dir", default="runs/sweep")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N or mps")
    parser.add_argument("--only", default=None,
                        help="comma-separated variant names to run (e.g. to split a sweep over parallel processes)")
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    base = parse_config(pretrain.PretrainConfig, ["--config", args.config, *extra])
    variants = load_variants(Path(args.variants))
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(variants))
        if unknown:
            parser.error(f"--only names variants {args.variants} does not have: {unknown}")
        variants = {name: variants[name] for name in wanted}
    device = resolve_device(args.device)
    out = Path(args.out_dir)
    # every variant's settings, checked now and not after the minutes of baselines
    configs = {name: replace(load_config(pretrain.PretrainConfig, None, {**vars(base), **overrides}),
                             out_dir=str(out / name), device=device, resume=True)
               for name, overrides in variants.items()}
    out.mkdir(parents=True, exist_ok=True)
    lines = out / "results.jsonl"
    done = read_results(lines)
    for name, cfg in configs.items():
        changed = changed_settings(done[name]["config"], cfg) if "config" in done.get(name, {}) else ""
        if changed:
            raise ValueError(f"{lines} already scores variant {name!r} with other settings ({changed}): use another "
                             f"--out-dir, or delete its line to train it again")

    # what the baselines depend on: the base model (random init, the probe images' size) and the seed
    scored_for = json.loads(json.dumps({"seed": base.seed, "model": pretrain.model_config(base).to_dict()}))
    recorded = {key: done.get("baselines", {}).get(key) for key in scored_for}
    if "baselines" in done and recorded["model"] is not None and recorded != scored_for:
        changed = [f"{key}: {recorded['model'].get(key)!r} -> {value!r}" for key, value in
                   scored_for["model"].items() if recorded["model"].get(key) != value]
        if recorded["seed"] != base.seed:
            changed.append(f"seed: {recorded['seed']!r} -> {base.seed!r}")
        raise ValueError(f"{lines} holds baselines scored for another base model or seed ({', '.join(changed)}): "
                         "its variants would be read against the wrong raw pixels and random init. Use another "
                         "--out-dir, or give the base settings it was started with")
    if "baselines" not in done:
        baseline = evaluation.evaluate_emoji_features(IJepa(pretrain.model_config(base)).eval(), base.seed,
                                                      device, sources=("raw_pixels", "random_init"))
        done["baselines"] = {"variant": "baselines", **scored_for, **baseline}
        with open(lines, "a") as f:
            f.write(json.dumps(done["baselines"]) + "\n")
    for name, overrides in variants.items():
        if name in done:
            continue
        cfg = configs[name]
        model = pretrain.train(cfg).eval()
        result = evaluation.evaluate_emoji_features(model, base.seed, device,
                                                    sources=("target_encoder", "context_encoder"))
        with open(out / name / "log.csv") as f:
            final_loss = float(f.read().strip().splitlines()[-1].split(",")[1])
        # from the log, which counts on across a resumed call (this call's clock would count only the rest)
        seconds = logged_training_seconds(out / name / "log.csv")
        done[name] = {"variant": name, "overrides": overrides, "config": config_dict(cfg),
                      "seconds": round(seconds, 1), "final_loss": final_loss, **result}
        with open(lines, "a") as f:
            f.write(json.dumps(done[name]) + "\n")

    pixels, random_init = (done["baselines"]["features"][k] for k in ("raw_pixels", "random_init"))
    print(f"raw pixels kNN group {pixels['knn_group']:.1f}, random init {random_init['knn_group']:.1f}")
    print("| variant | kNN group | kNN subgroup | linear group | context kNN group | object-only kNN group | "
          "final loss | train s |\n|---|---|---|---|---|---|---|---|")
    for name in variants:
        print(summary_row(name, done[name]))
    return [done[name] for name in variants]


if __name__ == "__main__":
    raise SystemExit(run_command(main, interrupted=f"{RESUME_HINT} (the sweep goes on from the variant it stopped "
                                                   "in; finished ones are kept in results.jsonl)"))
