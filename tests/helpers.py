"""Shared by the app tests: a tiny random bundle and `python app.py` served on a free port."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from ijepa.engine import build_random_bundle
from ijepa.model import IJepaConfig

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"
USE_ASSETS = (ASSETS / "model" / "config.json").is_file()
TINY_DECODER = dict(feature_channels=4, block_out_channels=(8, 16), attention_levels=(False, True),
                    attention_head_dim=8, norm_num_groups=4)
STARTUP_LIMIT_S = 60  # the goal is 20 s for the default bundle; this bound only catches hangs on a busy machine


def tiny_bundle(directory: Path, with_decoder: bool = True) -> Path:
    config = IJepaConfig.from_arch("vit_tiny", img_size=32, patch_size=4, depth=1, predictor_depth=1,
                                   predictor_embed_dim=48)
    return build_random_bundle(directory, config, TINY_DECODER if with_decoder else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_app(assets: Path, log: Path):
    """Run `python app.py --assets ...` until the block ends; yields (url, seconds until it answered)."""
    port = free_port()
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "app.py", "--assets", str(assets), "--port", str(port)],
                                   cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() - start > STARTUP_LIMIT_S:
                pytest.fail(f"app.py did not answer within {STARTUP_LIMIT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url, time.perf_counter() - start
    finally:
        process.terminate()
        process.wait(timeout=30)
