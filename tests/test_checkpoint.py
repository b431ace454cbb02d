"""Loading official-layout .pth.tar files and our safetensors folders, and refusing bad ones clearly."""
import json
import os

import pytest
import torch

from ijepa.checkpoint import CheckpointError, load_model, save_model
from ijepa.model import IJepa, IJepaConfig


def tiny_config(**kw) -> IJepaConfig:
    args = dict(img_size=32, patch_size=4, depth=2, predictor_depth=2, predictor_embed_dim=48, trained_on="test")
    args.update(kw)
    return IJepaConfig.from_arch("vit_tiny", **args)


def write_official(path, model: IJepa, **extra):
    """Exactly the official layout: DDP prefixes, optimizer and scaler state, bookkeeping scalars."""
    prefixed = lambda m: {f"module.{k}": v for k, v in m.state_dict().items()}  # noqa: E731
    opt = torch.optim.AdamW(model.encoder.parameters())
    payload = {"encoder": prefixed(model.encoder), "predictor": prefixed(model.predictor),
               "target_encoder": prefixed(model.target_encoder), "opt": opt.state_dict(), "scaler": None,
               "epoch": 300, "loss": 0.1, "batch_size": 128, "world_size": 16, "lr": 1e-3}
    payload.update(extra)
    torch.save(payload, path)


def outputs(model: IJepa, seed=0):
    torch.manual_seed(seed)
    images = torch.randn(2, 3, model.config.img_size, model.config.img_size)
    ctx = [torch.arange(0, 40).repeat(2, 1)]
    tgt = [torch.arange(50, 60).repeat(2, 1)]
    with torch.no_grad():
        tokens = model.encoder(images, ctx)
        return model.target_encoder(images), tokens, model.predictor(tokens, ctx, tgt)


@pytest.fixture
def model():
    torch.manual_seed(1)
    m = IJepa(tiny_config()).eval()
    with torch.no_grad():  # make the target encoder differ from the context encoder, as after training
        for p in m.target_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return m


def test_official_layout_loads_and_infers_the_architecture(tmp_path, model):
    path = tmp_path / "IN1K-vit.t.4-test.pth.tar"
    write_official(path, model)
    loaded = load_model(path)
    cfg = loaded.config
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads) == (32, 4, 192, 2, 3)
    assert (cfg.predictor_embed_dim, cfg.predictor_depth, cfg.predictor_num_heads) == (48, 2, 3)
    for ours, theirs in zip(outputs(loaded), outputs(model)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_giant_layout_keeps_the_predictors_own_mlp_ratio(tmp_path):
    """ViT-g's encoder MLP is 48/11 wide while the official predictor's stays 4: IN22K-vit.g.16 must load."""
    torch.manual_seed(2)
    giant_like = IJepa(tiny_config(embed_dim=88, num_heads=1, predictor_num_heads=1, mlp_ratio=48 / 11)).eval()
    assert giant_like.predictor.predictor_blocks[0].mlp.fc1.out_features == 4 * 48
    path = tmp_path / "IN22K-vit.g.test.pth.tar"
    write_official(path, giant_like)
    loaded = load_model(path)
    assert loaded.config.mlp_ratio == pytest.approx(48 / 11) and loaded.config.predictor_mlp_ratio == 4.0
    for ours, theirs in zip(outputs(loaded), outputs(giant_like)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_compiled_and_ddp_prefixes_are_stripped(tmp_path, model):
    path = tmp_path / "compiled.pth.tar"
    wrapped = {name: {f"_orig_mod.module.{k}": v for k, v in getattr(model, name).state_dict().items()}
               for name in ("encoder", "predictor", "target_encoder")}
    torch.save(wrapped, path)
    for ours, theirs in zip(outputs(load_model(path)), outputs(model)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_feature_encoder_choice(tmp_path, model):
    path = tmp_path / "ckpt.pth.tar"
    write_official(path, model)
    loaded = load_model(path)
    assert loaded.feature_encoder() is loaded.target_encoder
    assert loaded.feature_encoder("context") is loaded.encoder
    with pytest.raises(ValueError, match="target"):
        loaded.feature_encoder("student")


def test_encoder_only_file_loads_without_predictor(tmp_path, model):
    path = tmp_path / "encoder.pth"
    torch.save({f"module.{k}": v for k, v in model.target_encoder.state_dict().items()}, path)
    loaded = load_model(path)
    assert loaded.predictor is None and not loaded.config.has_predictor


def test_our_format_round_trip_rebuilds_without_flags(tmp_path, model):
    save_model(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["embed_dim"] == 192 and config["trained_on"] == "test"
    loaded = load_model(tmp_path / "m")
    for ours, theirs in zip(outputs(loaded), outputs(model)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    half = load_model(save_model(model, tmp_path / "h", dtype=torch.float16) / "model.safetensors")
    for ours, theirs in zip(outputs(half), outputs(model)):
        torch.testing.assert_close(ours, theirs, rtol=0.05, atol=0.05)


def test_resolution_change_at_load(tmp_path, model):
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m", img_size=48)
    assert loaded.config.grid_size == (12, 12)
    ctx, tgt = [torch.arange(100).repeat(1, 1)], [torch.arange(120, 130).repeat(1, 1)]
    with torch.no_grad():
        tokens = loaded.encoder(torch.randn(1, 3, 48, 48), ctx)
        assert loaded.predictor(tokens, ctx, tgt).shape == (1, 10, 192)


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ijepa_pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path, model):
    if os.path.exists("/tmp/ijepa_pwned"):
        os.remove("/tmp/ijepa_pwned")
    path = tmp_path / "evil.pth.tar"
    write_official(path, model, epoch=Exploit())
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path)
    assert not os.path.exists("/tmp/ijepa_pwned")


def test_missing_empty_and_truncated_files(tmp_path, model):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pth.tar")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_model(tmp_path / "empty.pth")
    full = tmp_path / "full.pth.tar"
    write_official(full, model)
    data = full.read_bytes()
    (tmp_path / "cut.pth.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "cut.pth.tar")
    save_model(model, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "m")


def test_unexpected_keys_and_shape_mismatch_are_named(tmp_path, model):
    state = {f"module.{k}": v for k, v in model.encoder.state_dict().items()}
    state["module.blocks.0.attn.extra_scale"] = torch.ones(1)
    torch.save({"encoder": state, "target_encoder": state}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="blocks.0.attn.extra_scale"):
        load_model(tmp_path / "extra.pth")

    enc = {f"module.{k}": v for k, v in model.encoder.state_dict().items()}
    bad_pred = {f"module.{k}": v for k, v in model.predictor.state_dict().items()}
    bad_pred["module.predictor_proj.weight"] = torch.zeros(100, 48)
    torch.save({"encoder": enc, "target_encoder": enc, "predictor": bad_pred}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"predictor_proj.weight has shape \(100, 48\)"):
        load_model(tmp_path / "shape.pth")


def test_not_a_checkpoint(tmp_path):
    torch.save({"weights": {"a": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no 'encoder'"):
        load_model(tmp_path / "other.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(CheckpointError, match=r"text.pth: not a PyTorch checkpoint; expected an official"):
        load_model(tmp_path / "text.pth")
    (tmp_path / "notes.pth.tar").write_text('{"json": "looks like pickle to torch"}')
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):  # not "refused": nothing would run code
        load_model(tmp_path / "notes.pth.tar")
    torch.save({"model": {}, "optimizer": {}, "step": 3}, tmp_path / "ckpt-00000003.pt")
    with pytest.raises(CheckpointError, match=r"ckpt-00000003.pt: a training checkpoint.*train.export_checkpoint"):
        load_model(tmp_path / "ckpt-00000003.pt")
    torch.save({"encoder": torch.zeros(3)}, tmp_path / "flat.pth")
    with pytest.raises(CheckpointError, match=r"flat.pth: its encoder entries are not state dicts .*'Tensor'"):
        load_model(tmp_path / "flat.pth")


@pytest.mark.parametrize("config, message", [
    ("null", "expected a JSON object, found NoneType"),
    ("[1, 2]", "expected a JSON object, found list"),
    ({"embed_dim": 190}, "embed_dim must be divisible by 4"),
])
def test_a_damaged_model_config_says_so(tmp_path, model, config, message):
    save_model(model, tmp_path / "m")
    if isinstance(config, dict):
        config = json.dumps({**json.loads((tmp_path / "m" / "config.json").read_text()), **config})
    (tmp_path / "m" / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=f"config.json: not a valid I-JEPA config: .*{message}"):
        load_model(tmp_path / "m")


def test_folders_that_are_not_a_model_say_what_to_pass(tmp_path, model):
    """--checkpoint given the bundle, a run folder or the decoder folder: each error names what to pass instead."""
    save_model(model, tmp_path / "bundle" / "model")
    with pytest.raises(CheckpointError, match=r"run or bundle folder: its model is .*bundle/model"):
        load_model(tmp_path / "bundle")
    decoder = tmp_path / "bundle" / "decoder"
    decoder.mkdir()
    (decoder / "config.json").write_text("{}")
    (decoder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="sketch decoder folder: load it with --decoder"):
        load_model(decoder)


@pytest.mark.parametrize("arch, patch, mlp_ratio", [("vit_huge", 14, 4.0), ("vit_giant", 16, 48 / 11)])
def test_the_released_checkpoints_architectures_are_read_off_their_shapes(arch, patch, mlp_ratio):
    """IN1K-vit.h.14 and IN22K-vit.g.16 at their real sizes (shapes only, on the meta device: no 2.5 GB of
    weights): the official key layout ('module.' prefixes) gives back the exact architecture to build."""
    from ijepa.checkpoint import infer_config, split_official

    expected = IJepaConfig.from_arch(arch, img_size=224, patch_size=patch, predictor_embed_dim=384,
                                     predictor_depth=12)
    with torch.device("meta"):
        official = IJepa(expected)
    raw = {name: {f"module.{k}": v for k, v in getattr(official, name).state_dict().items()}
           for name in ("encoder", "predictor", "target_encoder")}
    parts = split_official(raw)
    config = infer_config(parts["encoder"], parts["predictor"])
    got = (config.img_size, config.patch_size, config.embed_dim, config.depth, config.num_heads, config.mlp_ratio,
           config.predictor_embed_dim, config.predictor_depth, config.predictor_num_heads, config.predictor_mlp_ratio)
    assert got == pytest.approx((224, patch, expected.embed_dim, expected.depth, 16, mlp_ratio, 384, 12, 16, 4.0))
    assert (expected.embed_dim, expected.depth) == {"vit_huge": (1280, 32), "vit_giant": (1408, 40)}[arch]


def test_an_encoder_only_file_is_refused_by_the_app_with_the_reason(tmp_path, model):
    """A bare encoder (a timm-style export) loads for features, but the app needs the predictor and says so."""
    from ijepa.engine import Engine

    torch.save({f"module.{k}": v for k, v in model.encoder.state_dict().items()}, tmp_path / "encoder.pth")
    assert load_model(tmp_path / "encoder.pth").predictor is None
    with pytest.raises(ValueError, match="no predictor weights"):
        Engine.load(tmp_path / "encoder.pth", device="cpu")
