"""Which device and precision to run on: training (train.runtime), evaluation, the benchmarks and the app's
engine ask the same questions here; and what Linux says about this process (``process_status``)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")


def resolve_device(device: str) -> str:
    """"auto" -> CUDA when available, else CPU; a device that is not there -> ValueError saying what to pass."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda (or cuda:N) or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA GPU on this machine; use --device cpu (or auto)")
    if kind == "cuda" and ":" in device:
        index, count = device.split(":", 1)[1], torch.cuda.device_count()
        if not index.isdigit() or int(index) >= count:
            raise ValueError(f"--device {device}: torch sees {count} CUDA GPU(s), numbered 0 to {count - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: torch sees no Apple GPU (MPS) here; use --device cpu (or auto)")
    return device


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here: CUDA GPUs that support bf16, CPUs with AVX512-BF16 or AMX.

    Other CPUs (AVX2-only ones, most laptops among them) emulate bf16, and there a training step under bf16
    autocast ran ~20-60x slower than in fp32 (bench/RESULTS.md, "CPUs without native bf16")."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu has no public query
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_precision(device: torch.device, precision: str) -> str:
    """'auto' -> 'bf16' where bf16 is native (``fast_bf16``), else 'fp32'. An explicit 'bf16' is kept, with a
    warning where it is emulated."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, got {precision!r}")
    if precision == "auto":
        chosen = "bf16" if fast_bf16(device) else "fp32"
        logger.info("precision auto -> %s on %s", chosen, device)
        return chosen
    if precision == "bf16" and not fast_bf16(device):
        logger.warning("bf16 was asked for, but %s has no native bf16 (no AVX512-BF16 or AMX on a CPU): expect a "
                       "step many times slower than fp32; precision 'auto' picks fp32 here", device)
    return precision


def process_status(field: str) -> str | None:
    """The value of ``field`` (e.g. "VmRSS", "Umask") in Linux's /proc/self/status, or None where there is none."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(f"{field}:")), None)
