"""What every training script needs around its loop: devices, distributed setup, atomic checkpoints."""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import yaml

from ijepa.checkpoint import CheckpointError, load_weights_only, share_as_umask_allows
from ijepa.device import fast_bf16, resolve_device
from train.config import SCHEDULE_FIELDS, changed_settings, config_dict

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(device: str = "auto") -> Runtime:
    """Single process, or DDP when launched by torchrun (RANK set): NCCL on GPUs, gloo on CPUs. A device that is not
    there is refused in both (under torchrun a typo once trained every rank on the CPU)."""
    device = resolve_device(device)
    if "RANK" not in os.environ:
        return Runtime(device=torch.device(device))
    if device.startswith("mps"):
        raise ValueError("--device mps: torchrun's process groups run on CUDA (NCCL) or the CPU (gloo), not on an "
                         "Apple GPU; train in one process with --device mps, or use --device cpu under torchrun")
    use_cuda = device.startswith("cuda")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Runtime(rank, world, local, torch.device(f"cuda:{local}" if use_cuda else "cpu"))


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA and CPU (no GradScaler needed for bf16); a no-op context for fp32. Pass a precision
    resolved by ``resolve_precision``."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32' (resolve 'auto' first), got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def fused_adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.999, as the official code) with torch's fused kernel, on CUDA and on a CPU alike: the
    per-tensor loop's numbers up to float rounding, in one pass over each parameter instead of several kernels."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, fused=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a checkpoint's optimizer state but keep this optimizer's kernel (``fused``/``foreach``):
    ``load_state_dict`` would restore the saved one, so a run resumed from a checkpoint written before training
    used the fused kernel on a CPU would stay on the slower foreach loop, and so would every checkpoint after it."""
    kernel = {key: optimizer.defaults[key] for key in ("fused", "foreach")}
    optimizer.load_state_dict({**saved, "param_groups": [{**group, **kernel} for group in saved["param_groups"]]})


CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")


def save_checkpoint(state: dict, directory: Path, step: int, keep_last: int) -> Path:
    """Write ``ckpt-<step>.pt`` atomically (temp file, flushed to disk, then renamed) and keep only the newest
    ``keep_last``: a killed process or a lost machine leaves the previous checkpoint whole."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"ckpt-{step:08d}.pt"
    write_file_atomic(path, lambda tmp: torch.save(state, tmp))
    for old in list_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp files of a killed write are ignored)."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, mmap: bool = False, written_by: str = "train.pretrain or train.decoder") -> dict:
    """A training checkpoint: tensors and plain values only (``weights_only=True``), holding what our training
    scripts write; CheckpointError, saying which file and why, for anything else (a stray torch file named like a
    checkpoint would otherwise fail later with a KeyError or a settings diff against defaults). ``mmap``: for a
    look at its settings or keys, which reads no tensor. ``written_by``: the scripts the caller takes it from."""
    expected = f"a ckpt-<step>.pt file written by {written_by}"
    remedy = "move it aside and resume: the run continues from the one before"
    state = load_weights_only(path, expected=expected, mmap=mmap, remedy=remedy)
    if not isinstance(state, dict):
        holds = f"a {type(state).__name__}"
    else:
        missing = [key for key in ("step", "config", "optimizer") if key not in state]
        if not any(kind in state for kind in RUN_KINDS):
            missing.append(" or ".join(RUN_KINDS))
        if not missing:
            return state
        holds = f"no {', '.join(missing)}"
    raise CheckpointError(f"{path}: holds {holds}, so it is not a training checkpoint; expected {expected} ({remedy})")


# What the checkpoints of each training script hold, by the key only that script's have
RUN_KINDS = {"model": "pretraining (train.pretrain)", "decoder": "sketch decoder (train.decoder)"}


def refuse_another_kind(state: dict, path: Path, holds: str) -> None:
    """ValueError when the checkpoint ``state`` (at ``path``) is another training script's than the one whose
    checkpoints hold ``holds``: its settings would otherwise read as 'changed' defaults."""
    theirs = next((kind for key, kind in RUN_KINDS.items() if key in state and key != holds), None)
    if theirs and holds not in state:
        raise ValueError(f"{path.parent.parent} is a {theirs} run folder, not one of {RUN_KINDS[holds]}: choose "
                         "another --out-dir (nothing was overwritten)")


def resume_state(ckpt_dir: Path, config, world_size: int = 1, holds: str = "model") -> tuple[dict | None, Path | None]:
    """(state, path) of the newest checkpoint in ``ckpt_dir`` when ``config.resume`` is set, else (None, None).

    Refuses, before anything is written, to start over a run's checkpoints without --resume, to continue another
    training script's run (``holds``: the key this script's checkpoints hold, RUN_KINDS), and to resume with
    settings, or a number of processes, other than the ones the checkpoint was written with: either would not
    continue the run exactly (the batch is per process, and the data order follows the process count)."""
    existing = list_checkpoints(ckpt_dir)
    if existing and not config.resume:
        try:  # mapped, not read: only its keys are looked at
            refuse_another_kind(load_checkpoint(existing[-1], mmap=True), existing[-1], holds)
        except CheckpointError:
            pass  # unreadable: the message below stands, and --resume sets such a file aside
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints: pass --resume true to continue, "
                              f"or choose another --out-dir (nothing was overwritten)")
    if not existing:
        if config.resume:
            set_aside = sorted(ckpt_dir.glob("ckpt-*.pt.unreadable")) if ckpt_dir.is_dir() else []
            if set_aside:  # a run that got somewhere: starting it again from step 0 must be asked for
                raise CheckpointError(f"{ckpt_dir} holds only checkpoints that could not be read "
                                      f"({', '.join(p.name for p in set_aside)}), so this run cannot continue. "
                                      "Rename one back to retry it, delete them to train again from step 0, or "
                                      "choose another --out-dir")
            logger.info("no checkpoint in %s yet: starting the run from step 0", ckpt_dir)
        return None, None
    allowed = frozenset(getattr(config, "allow_changes", ()))
    if allowed - SCHEDULE_FIELDS:
        raise ValueError(f"--allow-changes accepts only schedule settings ({', '.join(sorted(SCHEDULE_FIELDS))}), "
                         f"not {', '.join(sorted(allowed - SCHEDULE_FIELDS))}")
    state, path = newest_readable(existing) if world_size == 1 else (load_checkpoint(existing[-1]), existing[-1])
    refuse_another_kind(state, path, holds)
    refused = changed_settings(state.get("config", {}), config, allowed)
    if refused:
        raise ValueError(f"cannot resume from {path}: its settings differ ({refused}), so the run would not "
                         "continue exactly. Resume with the original settings, or choose another --out-dir "
                         "(nothing was overwritten). A schedule setting may change on purpose with "
                         "--allow-changes NAME[,NAME].")
    changes = changed_settings(state.get("config", {}), config) if allowed else ""
    if changes:
        logger.warning("resuming from %s with changed settings (%s): from here the run differs from an "
                       "uninterrupted one", path, changes)
    saved_world = state.get("world_size", world_size)  # checkpoints from before it was stored: not checked
    if saved_world != world_size:
        raise ValueError(f"cannot resume from {path}: it was written by {saved_world} process(es) and this "
                         f"run has {world_size}, which changes the global batch and the data order. Resume with "
                         f"{saved_world} process(es) in all, or choose another --out-dir.")
    if state["step"] > config.steps:  # nothing would train, the log would run past the end, config.yaml say less
        raise ValueError(f"cannot resume from {path}: it is at step {state['step']}, past --steps {config.steps}. "
                         f"Resume with --steps {state['step']} or more, or choose another --out-dir (nothing was "
                         "overwritten).")
    return state, path


def newest_readable(checkpoints: list[Path], mmap: bool = False) -> tuple[dict, Path]:
    """(state, path) of the newest checkpoint that can be read. Ours are written whole or not at all, but a copied
    or damaged run folder can end in a truncated one: it is renamed ``<name>.unreadable`` (kept, but no longer
    listed, resumed from or counted by ``keep_last``) and the run continues from the one before. One process only:
    ranks that each chose for themselves could resume from different steps (``resume_state``)."""
    for path in reversed(checkpoints):
        try:
            return load_checkpoint(path, mmap), path
        except CheckpointError as err:
            aside = path.with_name(path.name + ".unreadable")
            path.rename(aside)
            logger.warning("%s; moved aside to %s, trying the checkpoint before it", err, aside.name)
    raise CheckpointError(f"none of the {len(checkpoints)} checkpoints in {checkpoints[0].parent} can be read (see "
                          "above; each was renamed *.unreadable): choose another --out-dir, or rename one back to "
                          "retry it")


class LossWindow:
    """The mean loss over the steps between two log steps, summed on the device (no host sync per step).

    ``close`` is the one place a training loop learns its loss: a NaN/inf on any rank stops every rank together,
    naming the last good checkpoint. Call it before every checkpoint with the weights that checkpoint would hold,
    so none holds weights that are already bad: a step can give a finite loss and NaN gradients (an overflow in
    the backward), which its update spreads to every weight and, through DDP's averaging, to every rank.
    """

    def __init__(self, runtime: Runtime, ckpt_dir: Path):
        self.runtime, self.ckpt_dir = runtime, ckpt_dir
        self.total = torch.zeros((), device=runtime.device)
        self.nonfinite = torch.zeros((), device=runtime.device)
        self.steps, self.start = 0, time.perf_counter()

    @staticmethod
    def due(step: int, config) -> bool:
        """Whether a loop closes its window after ``step``: at log steps, the last step and every checkpoint step."""
        return step % config.log_every == 0 or step == config.steps or step % config.ckpt_every == 0

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach()
        self.total += loss
        self.nonfinite += (~torch.isfinite(loss)).float()
        self.steps += 1

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` of non-training work (evaluation) out of the window's time."""
        self.start += seconds

    def close(self, step: int, weights: Iterable[torch.Tensor] = ()) -> tuple[float, float, int]:
        """(mean loss, seconds, steps) of the window, averaged over ranks; then a fresh window. A NaN/inf in any of
        ``weights`` stops the run as a NaN/inf loss does."""
        weights = list(weights)
        if weights:  # one reduction on the device, no host sync of its own
            self.nonfinite += (~torch.stack([torch.isfinite(w).all() for w in weights])).sum()
        if self.runtime.distributed:
            dist.all_reduce(self.total)
            dist.all_reduce(self.nonfinite)
            self.total /= self.runtime.world_size
        if self.nonfinite.item() > 0:  # the weights are now suspect: stop before anything is saved
            good = list_checkpoints(self.ckpt_dir)
            raise FloatingPointError(
                f"loss or weights became NaN/inf by step {step}; stopping. The last good checkpoint is "
                f"{good[-1] if good else 'none (no checkpoint yet)'}. Check the data, or go on from it with a lower "
                f"learning rate: the same command with --resume true --lr <lower> --allow-changes lr (in python -m "
                f"train.default, which resumes by itself: --pretrain.lr <lower> --pretrain.allow-changes lr, or the "
                f"same with --decoder.).")
        result = self.total.item() / max(1, self.steps), time.perf_counter() - self.start, self.steps
        self.total.zero_()
        self.steps, self.start = 0, time.perf_counter()
        return result


def csv_rows(path: Path, header: str | None = None) -> tuple[list[list[str]], int]:
    """(rows, how many were dropped) of a training CSV log: rows whose fields do not match ``header`` (None: the
    log's own first line) are left out rather than stopping a resume (the last row of a run killed while appending
    it, a damaged file)."""
    lines = path.read_text(errors="replace").splitlines()
    if header is None:
        header = lines[0] if lines else ""
    rows, dropped = [], 0
    for line in lines[1:]:
        fields = line.split(",")
        try:
            if len(fields) != header.count(",") + 1:
                raise ValueError(line)
            int(fields[0]), float(fields[-1])
        except ValueError:
            dropped += 1
            continue
        rows.append(fields)
    return rows, dropped


def start_csv_log(path: Path, header: str, start_step: int) -> None:
    """A fresh CSV log, or on resume the existing one cut back to the rows up to the checkpoint's step, so a
    resumed run's log reads exactly like an uninterrupted one. Written whole or not at all: a kill while it is cut
    back leaves the old log."""
    rows, dropped = csv_rows(path, header) if start_step > 0 and path.exists() else ([], 0)
    if dropped:
        logger.warning("%s: left out %d row(s) that could not be read (cut short or damaged)", path, dropped)
    kept = [",".join(row) for row in rows if int(row[0]) <= start_step]
    write_file_atomic(path, lambda tmp: tmp.write_text("\n".join([header, *kept]) + "\n"))


def elapsed_by_step(path: Path) -> dict[int, float]:
    """{step: elapsed_s} of a training CSV log (first column step, last column elapsed_s)."""
    rows, _ = csv_rows(path)
    return {int(row[0]): float(row[-1]) for row in rows}


def logged_training_seconds(path: Path) -> float:
    """The training seconds a CSV log records up to its last row (elapsed_s counts on across resumed calls); 0 when
    there is no log or no row yet."""
    elapsed = elapsed_by_step(path) if path.is_file() else {}
    return elapsed[max(elapsed)] if elapsed else 0.0


def write_file_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temp file)``, flush it to disk, then rename it to ``path``: a killed process or a lost machine leaves
    the old file whole, never a half-written one under the final name."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as err:
        # torch.save reports a full disk as "RuntimeError: [enforce fail at inline_container.cc] unexpected pos"
        full = isinstance(err, RuntimeError) and tmp.exists() and shutil.disk_usage(tmp.parent).free < 2**20
        tmp.unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, f"No space left on device for {path} (the files written before it are "
                          "kept; free some space and resume)") from err
        raise
    os.replace(tmp, path)


def write_json_atomic(path: Path, data) -> None:
    write_file_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def read_json(path: Path, remedy: str):
    """A JSON file a command of ours wrote; one damaged since (a disk that filled up, a copy cut short) is named,
    with ``remedy``, instead of a bare JSONDecodeError."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is damaged (not JSON: {err}): {remedy}") from None


def save_config(config, path: Path) -> None:
    """A run's settings as config.yaml, written whole or not at all."""
    write_file_atomic(path, lambda tmp: tmp.write_text(yaml.safe_dump(config_dict(config), sort_keys=False)))


SWAP_MARK = ".swap-"  # save_folder_atomic works in <name>.swap-XXXXXX beside <name>


def swap_leftover_of(name: str) -> str | None:
    """The folder name a ``save_folder_atomic`` swap folder named ``name`` belongs to (one a kill left), or None."""
    owner, mark, _ = name.partition(SWAP_MARK)
    return owner if mark else None


def save_folder_atomic(write: Callable[[Path], None], directory: Path) -> None:
    """``write(folder)`` into a temporary sibling, then swap it in for ``directory`` (the old one moved aside first
    and deleted last): a kill mid-write never leaves a half-written folder that looks finished (e.g. a diffusers
    folder, whose config.json is written before its weights). The swap happens in a folder of its own
    (``<name>.swap-XXXXXX``), so no sibling such as a user's ``<name>.old`` backup is ever touched. A kill can leave
    that folder behind, and one between the two renames leaves no ``directory``: the next call for the same
    ``directory`` first finishes or undoes such a swap (``recover_swaps``)."""
    recover_swaps(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    swap = Path(tempfile.mkdtemp(prefix=directory.name + SWAP_MARK, dir=directory.parent))
    staged, old = swap / directory.name, swap / (directory.name + ".old")
    try:
        write(staged)
        share_as_umask_allows(staged)  # diffusers' save_pretrained writes its weights 0600
    except BaseException:
        shutil.rmtree(swap, ignore_errors=True)
        raise
    if directory.exists():
        os.replace(directory, old)
    os.replace(staged, directory)
    shutil.rmtree(swap)


def recover_swaps(directory: Path) -> None:
    """Clean up after ``save_folder_atomic`` calls for ``directory`` that a kill stopped. Where the old folder was
    moved aside but the new one not yet moved in, the new one was complete (it is moved only once written), so the
    swap is finished; every other swap folder holds an unfinished write or a finished swap's leftovers, and goes."""
    if not directory.parent.is_dir():
        return
    for swap in sorted(directory.parent.glob(glob.escape(directory.name) + SWAP_MARK + "*")):
        staged, old = swap / directory.name, swap / (directory.name + ".old")
        if not directory.exists() and old.exists():
            kept = staged if staged.exists() else old
            os.replace(kept, directory)
            logger.warning("%s had been moved aside by a stopped run: %s", directory,
                           "its replacement, already written, is in place now" if kept == staged else "it is back")
        shutil.rmtree(swap, ignore_errors=True)


def plot_loss_curve(csv_path: Path, png_path: Path, title: str = "I-JEPA pretraining loss") -> None:
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


CODE_PATHS = ("app.py", "ijepa", "decoder", "train", "bench", "requirements.txt")  # what makes a run's results
CODE_VERSION_ENV = "IJEPA_CODE_VERSION"  # what a copy without .git says it is (bench/device_run.sh sets it)


def code_version() -> str:
    """The commit of this checkout, for model cards: "abc1234", "abc1234 with local changes"; outside a git checkout
    (a copied working tree, an installed copy) what IJEPA_CODE_VERSION says, else "unknown"."""
    root = Path(__file__).resolve().parents[1]
    fallback = os.environ.get(CODE_VERSION_ENV, "unknown")
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=30)
        # the code only: an export into assets/ changes tracked files, not the code that trains
        changes = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                  *CODE_PATHS], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return fallback
    if commit.returncode != 0:
        return fallback
    return commit.stdout.strip() + (" with local changes" if changes.stdout.strip() else "")


def hardware() -> str:
    """The machine in words, for model cards and results: the GPU, or the CPU with its threads and bf16 support."""
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
