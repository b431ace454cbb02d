"""Where bf16 is worth using: training (train.runtime) and the app's decoder (ijepa.engine) ask the same question."""
from __future__ import annotations

import torch


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
