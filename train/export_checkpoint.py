"""Turn a pretraining checkpoint into a model folder that train.eval, train.decoder and the app load:

    python -m train.export_checkpoint runs/tiny                                  # newest: runs/tiny/model_<step>
    python -m train.export_checkpoint runs/tiny/checkpoints/ckpt-00007000.pt --out runs/tiny/model_7000

A run exports ``<out_dir>/model`` only when it finishes; this gives the same folder for any step it kept, so a
killed run's last checkpoint, or a step in the middle of a schedule, can be scored and viewed without resuming.
The checkpoint carries its run's config, so nothing has to be given again.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import zipfile
from pathlib import Path

from ijepa.checkpoint import WEIGHTS_NAME, save_model
from ijepa.model import IJepa, IJepaConfig
from train.config import load_config, run_command
from train.pretrain import PretrainConfig, model_config
from train.runtime import list_checkpoints, load_checkpoint, save_folder_atomic

logger = logging.getLogger("train.export_checkpoint")


def newest_checkpoint(path: Path) -> Path:
    """``path`` itself when it is a checkpoint file, else the newest complete checkpoint of the run folder."""
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a ckpt-<step>.pt file or a train.pretrain run folder")
    found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
    if not found and (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{path} is a model folder already: train.eval, train.decoder and the app load it as "
                                "it is")
    if not found:
        raise FileNotFoundError(f"{path}: no checkpoint (ckpt-<step>.pt) in it or in {path / 'checkpoints'}")
    for newest in reversed(found):  # a copied run's newest file may be cut short: the one before it then
        try:  # torch.save's zip archive keeps its directory at the end: a cut file has none (read in milliseconds)
            with zipfile.ZipFile(newest):
                return newest
        except (zipfile.BadZipFile, OSError) as err:
            logger.warning("skipping %s, which is cut short or damaged: %s", newest, err)
    raise FileNotFoundError(f"{path}: none of its {len(found)} checkpoints is complete")


def model_from_checkpoint(checkpoint: Path) -> tuple[IJepa, int, PretrainConfig]:
    """The model of a pretraining checkpoint, rebuilt from the settings it records; its step; those settings."""
    state = load_checkpoint(checkpoint, written_by="train.pretrain")
    if "decoder" in state:
        raise ValueError(f"{checkpoint}: a checkpoint of train.decoder, not of train.pretrain; a decoder run exports "
                         "its decoder itself, into decoder/ in its --out-dir")
    if not {"model", "config", "step"} <= set(state):
        raise ValueError(f"{checkpoint}: not a pretraining checkpoint of train.pretrain (it holds {sorted(state)[:6]})")
    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    dropped = sorted(set(state["config"]) - known)
    if dropped:  # settings of an older version of train.pretrain; the weights' shapes are checked below
        logger.warning("%s: ignoring settings this version does not know: %s", checkpoint, dropped)
    cfg = load_config(PretrainConfig, None, {k: v for k, v in state["config"].items() if k in known})
    # the model's settings as the run recorded them (its data catalog's fingerprint too, not this machine's); a
    # checkpoint from before they were recorded rebuilds them from the run's settings
    model = IJepa(IJepaConfig.from_dict(state["model_config"]) if "model_config" in state else model_config(cfg))
    model.load_state_dict(state["model"])
    return model, int(state["step"]), cfg


def export_checkpoint(checkpoint: Path, out_dir: Path | None = None) -> Path:
    """Write the model of a pretraining checkpoint as ``config.json`` + ``model.safetensors``; returns the folder
    (by default ``model_<step>`` beside the run's ``checkpoints`` folder)."""
    model, step, _ = model_from_checkpoint(checkpoint)
    if out_dir is None:
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
        out_dir = run_dir / f"model_{step}"
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):  # another model's, or a run's files
        raise FileExistsError(f"{out_dir} already exists and is not an empty folder: choose another --out, or "
                              "remove it to export again (nothing was written)")
    save_folder_atomic(lambda folder: save_model(model, folder), out_dir)  # whole or not at all
    logger.info("exported step %d of %s to %s", step, checkpoint, out_dir)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a ckpt-<step>.pt file, or a run folder (its newest one)")
    parser.add_argument("--out", type=Path, default=None, help="model folder to write (default: <run>/model_<step>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    export_checkpoint(newest_checkpoint(args.checkpoint), args.out)


if __name__ == "__main__":
    raise SystemExit(run_command(main))
