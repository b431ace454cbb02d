"""Shared by the app and bundle tests: a tiny random bundle, `python app.py` served on a free port, and the checks
every exported bundle must pass."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from decoder import SketchDecoder
from ijepa.checkpoint import load_model

from ijepa.bundle import build_random_bundle
from ijepa.engine import Engine
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


def assert_bundle_parts_agree(bundle: Path):
    """Model, both decoders, probes, bank and metrics of an exported bundle describe the same model."""
    model = load_model(bundle / "model")
    cfg = model.config
    assert model.predictor is not None
    for name, conditioning in (("decoder", "spatial_context"), ("decoder_paper", "pooled")):
        decoder = SketchDecoder.from_pretrained(bundle / name)
        assert decoder.config.conditioning == conditioning
        assert decoder.config.feature_dim == cfg.embed_dim
        assert tuple(decoder.config.grid_size) == cfg.grid_size and decoder.config.image_size == cfg.img_size
    for level in ("group", "subgroup"):
        probe = load_file(bundle / f"probe_{level}.safetensors")
        index = json.loads((bundle / f"probe_{level}.json").read_text())
        assert probe["linear.weight"].shape == (len(index["labels"]), cfg.embed_dim)
        assert model.has_signature(index["model_signature"]), level  # fitted on this model's features
    assert model.has_signature(json.loads((bundle / "bank.json").read_text())["model_signature"])
    bank = load_file(bundle / "bank.safetensors")
    assert bank["features"].shape[1] == cfg.embed_dim
    assert len(bank["thumbnails"]) == len(bank["features"]) == len(bank["subgroup"])
    metrics = json.loads((bundle / "metrics.json").read_text())
    trained = metrics["pretrain_config"]  # what pretraining was asked for, against what the weights rebuild
    for name in ("img_size", "patch_size", "predictor_depth", "predictor_embed_dim", "arch"):
        assert trained[name] == getattr(cfg, name), name
    assert trained["depth"] in (None, cfg.depth)
    # the recipe trains both decoders with one config; train.replace_decoder may swap either for a longer one
    recipe_decoder = metrics.get("recipe_decoder_config", metrics["decoder_config"])
    trained_with = {"decoder": metrics["decoder_config"],
                    "decoder_paper": metrics.get("paper_decoder_config", recipe_decoder)}
    assert metrics["decoder_config"]["conditioning"] == "spatial_context"
    for name, decoder_trained in trained_with.items():
        assert list(SketchDecoder.from_pretrained(bundle / name).config.block_out_channels) == list(
            decoder_trained["block_out_channels"]), name
    card = (bundle / "MODEL_CARD.md").read_text()
    assert f"{trained['steps']} steps x batch {trained['batch_size']}" in card
    assert f"{trained['steps'] * trained['batch_size']:,} images seen" in card
    return cfg


def assert_a_box_produces_sketches(bundle: Path) -> None:
    """The app's engine loads the bundle, and the first example's box gives two streamed sketches."""
    engine = Engine.load(bundle, device="cpu")
    assert engine.has_decoder and engine.examples and engine.probes and engine.bank is not None
    example = engine.examples[0]
    analysis = engine.analyze(example.image(), list(example.boxes))
    final = list(engine.stream_sketches(analysis, num_samples=2, seed=0))[-1]
    assert final.done and len(final.images) == 2  # each image: every box filled with one sample
    for sketch in final.images:
        assert sketch.dtype == np.uint8 and sketch.shape[-1] == 3 and sketch.std() > 0
    assert np.isfinite(analysis.metrics()["boxes"][0]["prediction_error"])


def train_on_two_gloo_ranks(setup: str, out_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``setup`` (Python that defines ``cfg`` and ``train``) under torchrun as 2 CPU ranks (gloo), then
    ``train(cfg)``; returns each rank's trained parameters, flattened."""
    out_dir.mkdir(parents=True, exist_ok=True)
    script = out_dir / "two_ranks.py"
    script.write_text(textwrap.dedent(setup) + textwrap.dedent(f"""
        import os, torch
        trained = train(cfg)
        flat = torch.cat([p.detach().flatten() for p in trained.parameters()])
        torch.save(flat, os.path.join({str(out_dir)!r}, f"params-rank{{os.environ['RANK']}}.pt"))
    """))
    result = run_on_two_gloo_ranks(script)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out_dir / "params-rank0.pt"), torch.load(out_dir / "params-rank1.pt")


def run_on_two_gloo_ranks(script: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 script`` on the CPU (gloo), one thread per rank; a hang fails by timeout."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
