"""The supervised reference trains the encoder the protocol scores: its loss falls, and what is scored as the
target encoder is the trained encoder."""
import torch

from bench.supervised_reference import train_supervised
from train.config import parse_config
from train.pretrain import PretrainConfig

TINY = ["--img-size", "32", "--patch-size", "4", "--depth", "1", "--predictor-depth", "1", "--predictor-embed-dim",
        "48", "--batch-size", "16", "--steps", "40", "--warmup-steps", "4", "--lr", "0.002", "--num-workers", "0",
        "--log-every", "1", "--precision", "fp32", "--num-distractors", "0,0"]


def test_loss_falls_and_the_trained_encoder_is_what_gets_scored():
    cfg = parse_config(PretrainConfig, TINY)
    model, stats = train_supervised(cfg, "group", torch.device("cpu"))
    losses = [loss for _, loss in stats["loss_log"]]
    assert len(losses) == cfg.steps and stats["images"] == 40 * 16
    assert sum(losses[-8:]) / 8 < 0.9 * sum(losses[:8]) / 8
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(tensor, model.target_encoder.state_dict()[name]), name
    assert not model.training
