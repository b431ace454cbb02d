"""Put a longer-trained sketch decoder into a finished bundle, re-score both decoders and rewrite the model card.

Train the decoder on the bundle's own model, then swap it in:

    python -m train.decoder --checkpoint assets/model --steps 3000 --batch-size 32 \
        --block-out-channels 32,64,128 --warmup-steps 75 --out-dir runs/decoder_long
    python -m train.replace_decoder --bundle assets --run runs/decoder_long

The one-command recipe (train/default.py) gives its decoders what its time budget leaves, which on a CPU is brief;
a decoder trained longer on the same frozen model draws better sketches. This swaps it in without retraining the
rest: the run must have been trained on exactly the bundle's model weights, its conditioning says which of the two
decoders it replaces (ours, or with ``--conditioning pooled`` the paper-faithful one, so the app can compare the two
at equal length), both are scored together by `train.eval_decoder` on the protocol the bundle was scored with, and
metrics.json keeps the recipe's own equal-length comparison beside the new figures, so the card can state both.
Nothing in the bundle changes until the new evaluation has finished, and then the bundle is swapped whole.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import shutil
import time
from pathlib import Path

import torch
import yaml

from decoder import SketchDecoder
from ijepa.bundle import DECODER_DIRS, METRICS_NAME, MODEL_CARD_NAME, MODEL_DIR, bundle_metrics_path
from ijepa.checkpoint import share_as_umask_allows
from train import eval_decoder
from train.config import RUN_ONLY_FIELDS, config_dict, doc_summary, run_command
from train.decoder import DecoderTrainConfig
from train.model_card import DECODER_RECORDS, write_model_card
from train.runtime import hardware, logged_training_seconds, save_folder_atomic, write_json_atomic

logger = logging.getLogger("train.replace_decoder")
OURS = "spatial_context"  # the decoder the app draws with by default


def folder_digest(path: Path) -> str:
    """sha256 over a folder's file names and bytes: the same weights, wherever they were copied."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def check_run(bundle: Path, run: Path) -> dict:
    """The run's training config, after checking it is a finished decoder trained on the bundle's model."""
    if not run.is_dir():
        raise FileNotFoundError(f"--run {run}: no such folder (the --out-dir of a python -m train.decoder run)")
    if (run / "config.json").is_file() and (run.parent / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is the decoder itself: pass its run folder, --run {run.parent}")
    if not (run / "decoder" / "config.json").is_file() or not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} holds no finished decoder ({run}/decoder/config.json): finish its training "
                                f"first (python -m train.decoder ... --out-dir {run} --resume true)")
    config = yaml.safe_load((run / "config.yaml").read_text())
    if config.get("conditioning") not in DECODER_DIRS:
        raise ValueError(f"{run} trained a {config.get('conditioning')!r} decoder; a bundle holds "
                         f"{' and '.join(map(repr, DECODER_DIRS))} ones")
    trained_on = Path(config["checkpoint"])
    if not trained_on.is_dir() or folder_digest(trained_on) != folder_digest(bundle / MODEL_DIR):
        raise ValueError(f"{run} was trained on {trained_on}, not on the weights in {bundle / MODEL_DIR}: its "
                         f"sketches would describe another model. Train it with --checkpoint {bundle / MODEL_DIR}")
    return config


def replace_decoder(bundle: Path, run: Path, eval_dir: Path, replaced_by: str, command: str | None = None) -> dict:
    """Score ``run``'s decoder with the bundle's other one, then swap it in; returns the new metrics.
    ``command`` is the training command the card quotes (default: rebuilt from the run's saved settings)."""
    metrics_path = bundle_metrics_path(bundle)
    try:
        metrics = json.loads(metrics_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{metrics_path} is not valid JSON ({err}): restore it from the bundle's copy in git or "
                         "export the bundle again") from None
    if "command" not in metrics:
        raise ValueError(f"{metrics_path} does not record the recipe's command, which the card quotes: export the "
                         "bundle again with python -m train.default ... --export")
    config = check_run(bundle, run)
    slot = config["conditioning"]

    # Scored as it will ship, in fp16 like the decoder beside it, then swapped in from that same copy.
    shipped = eval_dir / "decoder_fp16"
    SketchDecoder.load_checked(run / "decoder", torch_dtype=torch.float16).save_pretrained(shipped)
    share_as_umask_allows(shipped)
    scored = {name: shipped if name == slot else bundle / folder for name, folder in DECODER_DIRS.items()}
    start = time.perf_counter()
    eval_decoder.evaluate_decoders(bundle / MODEL_DIR, scored[OURS], scored["pooled"], eval_dir,
                                   num_images=metrics["decoders"]["num_images"])
    eval_seconds = time.perf_counter() - start
    results = json.loads((eval_dir / "results.json").read_text())

    # The recipe's figures (both decoders equally long) stay beside the new ones; a second replacement keeps them.
    metrics.setdefault("recipe_decoders", metrics["decoders"])
    metrics.setdefault("recipe_decoder_config", metrics["decoder_config"])
    train_seconds = logged_training_seconds(run / "log.csv")
    _, config_key, retrained_key = DECODER_RECORDS[slot]
    metrics.update({"decoders": results, config_key: config, retrained_key: {
        "command": command or training_command(config), "replaced_by": replaced_by, "hardware": hardware(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "train_seconds": round(train_seconds, 1) or None, "eval_seconds": round(eval_seconds, 1)}})

    def write(staged: Path) -> None:
        shutil.copytree(bundle, staged)
        shutil.rmtree(staged / DECODER_DIRS[slot])
        shutil.copytree(shipped, staged / DECODER_DIRS[slot])
        shutil.copy(eval_dir / "samples.png", staged / "samples.png")
        write_json_atomic(staged / METRICS_NAME, metrics)
        write_model_card(metrics, staged / MODEL_CARD_NAME)

    # The whole bundle (~30 MB) written beside the old one and swapped in: a kill or a failure leaves the old bundle
    # or the new one, never a new decoder under the old card and figures.
    save_folder_atomic(write, bundle)
    replaced = next(d for d in results["decoders"].values() if d["conditioning"] == slot)
    logger.info("replaced %s/%s: retrieval %.1f %%, diversity %.3f; card rewritten", bundle, DECODER_DIRS[slot],
                replaced["retrieval_top1"], replaced["diversity_rms"])
    return metrics


def training_command(saved: dict) -> str:
    """The train.decoder command that reproduces a run, from the settings it saved (defaults left out)."""
    defaults = config_dict(DecoderTrainConfig())
    flags = []
    for name, value in saved.items():
        if (name in RUN_ONLY_FIELDS and name != "out_dir") or value == defaults.get(name):
            continue
        shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        flags.append(f"--{name.replace('_', '-')} {shlex.quote(shown)}")  # a path with a space stays one argument
    return "python -m train.decoder " + " ".join(flags)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=doc_summary(__doc__))
    parser.add_argument("--bundle", default="assets", help="a folder exported by python -m train.default --export")
    parser.add_argument("--run", required=True, help="a train.decoder --out-dir, trained on the bundle's model")
    parser.add_argument("--eval-dir", default=None, help="where the evaluation goes (default: <run>/eval)")
    parser.add_argument("--command", default=None,
                        help="the training command the card quotes (default: read back from <run>/config.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run = Path(args.run)
    replaced_by = shlex.join(["python", "-m", "train.replace_decoder", "--bundle", args.bundle, "--run", args.run])
    replace_decoder(Path(args.bundle), run, Path(args.eval_dir or run / "eval"), replaced_by, args.command)


if __name__ == "__main__":
    raise SystemExit(run_command(main))
