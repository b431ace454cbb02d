"""Loading official-layout .pth.tar files and our safetensors folders, and refusing bad ones clearly."""
import json
import logging
import math
import os
import pickle
import warnings
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ijepa.checkpoint
from ijepa.checkpoint import CheckpointError, load_model, save_model
from ijepa.model import IMAGENET_MEAN, IMAGENET_STD, IJepa, IJepaConfig

FIXTURES = Path(__file__).parent / "fixtures"


def tiny_config(**kw) -> IJepaConfig:
    args = dict(img_size=32, patch_size=4, depth=2, predictor_depth=2, predictor_embed_dim=48, trained_on="test")
    args.update(kw)
    return IJepaConfig.from_arch("vit_tiny", **args)


def prefixed(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict as the official DDP-wrapped training saves it."""
    return {f"module.{k}": v for k, v in module.state_dict().items()}


def write_official(path, model: IJepa, legacy: bool = False, **extra):
    """Exactly the official layout: DDP prefixes, optimizer and scaler state, bookkeeping scalars. ``legacy``: in
    torch.save's old non-zip format, as files written before PyTorch 1.6 (or with that option) are."""
    opt = torch.optim.AdamW(model.encoder.parameters())
    payload = {"encoder": prefixed(model.encoder), "predictor": prefixed(model.predictor),
               "target_encoder": prefixed(model.target_encoder), "opt": opt.state_dict(), "scaler": None,
               "epoch": 300, "loss": 0.1, "batch_size": 128, "world_size": 16, "lr": 1e-3}
    payload.update(extra)
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)


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
    # Built on the meta device and given the file's tensors: nothing left unloaded, and the one encoder in the file
    # became two that do not share memory, so training the context encoder leaves the target encoder alone.
    tensors = list(loaded.state_dict().values())
    assert not any(t.is_meta for t in tensors)
    fresh = IJepa(loaded.config)  # which weights train (the target encoder and the sin-cos tables do not)
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in fresh.parameters()]
    with torch.no_grad():
        next(loaded.encoder.parameters()).add_(1.0)
    for context, target in zip(loaded.encoder.parameters(), loaded.target_encoder.parameters()):
        assert context.data_ptr() != target.data_ptr()
    torch.testing.assert_close(next(loaded.target_encoder.parameters()), next(model.target_encoder.parameters()))


def test_a_file_without_target_encoder_says_so_where_the_app_shows_it(tmp_path, model):
    """The paper's features are the target encoder's: a slimmed file that lost it must say what stands in."""
    path = tmp_path / "slim.pth.tar"
    torch.save({"encoder": prefixed(model.encoder), "predictor": prefixed(model.predictor)}, path)
    loaded = load_model(path)
    assert "no target_encoder, so the context encoder stands in for it" in loaded.config.trained_on
    full = tmp_path / "full.pth.tar"
    torch.save({name: prefixed(getattr(model, name)) for name in ("encoder", "predictor", "target_encoder")}, full)
    assert "stands in" not in load_model(full).config.trained_on


def test_a_flat_state_dict_of_a_whole_model_is_named_with_what_to_do(tmp_path, model):
    """torch.save(model.state_dict()) was called 'not an I-JEPA checkpoint' (its keys under 'encoder.')."""
    for prefix in ("", "module."):
        path = tmp_path / f"flat{prefix}pth"
        torch.save({f"{prefix}{k}": v for k, v in model.state_dict().items()}, path)
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: the flat state dict of a whole I-JEPA "
                                                  r"model .*ijepa.save_model\(model, folder\)"):
            load_model(path)


def test_the_out_dir_of_the_recipe_is_pointed_at_its_model(tmp_path):
    """python -m train.default leaves its bundle in <out-dir>/bundle: the out-dir passed as a model says where."""
    for inner in ("bundle/model", "pretrain/model"):
        out = tmp_path / inner.split("/")[0] / "run"
        (out / inner).mkdir(parents=True)
        (out / inner / "model.safetensors").write_bytes(b"")
        with pytest.raises(CheckpointError, match=rf"out-dir of python -m train.default: its model is .*{inner}"):
            load_model(out)


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
    with pytest.raises(CheckpointError, match="refused") as refused:
        load_model(path)
    assert not os.path.exists("/tmp/ijepa_pwned")
    detail = str(refused.value).split("Details: ")[1]  # what was refused, not torch's advice to its own users
    assert "system" in detail and "weights_only" not in detail and "file an issue" not in detail
    with open(tmp_path / "plain.pkl", "wb") as f:  # a pickle, not torch.save's format
        pickle.dump({"a": 1}, f, protocol=4)
    with pytest.raises(CheckpointError, match="refused") as refused, warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning from torch asking the user to file an issue
        load_model(tmp_path / "plain.pkl")
    assert "file an issue" not in str(refused.value) and "Unsupported operand" in str(refused.value)


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



def test_a_zeroed_stretch_is_not_loaded_as_zero_weights(tmp_path, model):
    """A download that pre-allocated the file and stopped leaves zeros: mapped, torch loaded them as weights."""
    full = tmp_path / "full.pth.tar"
    write_official(full, model)
    data = bytearray(full.read_bytes())
    middle = len(data) // 2
    data[middle: middle + len(data) // 4] = bytes(len(data) // 4)
    (tmp_path / "holed.pth.tar").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"holed.pth.tar: .*damaged \(download it again\)"):
        load_model(tmp_path / "holed.pth.tar")
    load_model(full)  # the check passes an intact file

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
    ({"embed_dim": 198}, "embed_dim must be divisible by 4"),
    ({"num_heads": 5}, r"must be a multiple of num_heads \(5\)"),  # was timm's AssertionError
    ({"patch_size": 0}, "patch_size must be a positive whole number"),  # was a ZeroDivisionError
])
def test_a_damaged_model_config_says_so(tmp_path, model, config, message):
    save_model(model, tmp_path / "m")
    if isinstance(config, dict):
        config = json.dumps({**json.loads((tmp_path / "m" / "config.json").read_text()), **config})
    (tmp_path / "m" / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=f"config.json: not a valid I-JEPA config: .*{message}"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("key", ["img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
                                 "predictor_embed_dim", "predictor_depth", "predictor_num_heads"])
def test_a_config_without_an_architecture_key_says_which(tmp_path, model, key):
    """The defaults would have built another network and blamed the weights ("missing keys blocks.1...")."""
    save_model(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config[key]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"config.json lacks {key}: "):
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
    with pytest.raises(CheckpointError, match=r"sketch decoder folder, not a model \(the app takes it with --decoder"):
        load_model(decoder)


@pytest.mark.parametrize("arch, patch, mlp_ratio, predictor_depth",
                         [("vit_huge", 14, 4.0, 12), ("vit_giant", 16, 48 / 11, 16)])  # official configs' pred_depth
def test_the_released_checkpoints_architectures_are_read_off_their_shapes(arch, patch, mlp_ratio, predictor_depth):
    """IN1K-vit.h.14 and IN22K-vit.g.16 at their real sizes (shapes only, on the meta device: no 2.5 GB of
    weights): the official key layout ('module.' prefixes) gives back the exact architecture to build."""
    from ijepa.checkpoint import infer_config, split_official

    expected = IJepaConfig.from_arch(arch, img_size=224, patch_size=patch, predictor_embed_dim=384,
                                     predictor_depth=predictor_depth)
    with torch.device("meta"):
        official = IJepa(expected)
    raw = {name: {f"module.{k}": v for k, v in getattr(official, name).state_dict().items()}
           for name in ("encoder", "predictor", "target_encoder")}
    parts = split_official(raw)
    config = infer_config(parts["encoder"], parts["predictor"])
    got = (config.img_size, config.patch_size, config.embed_dim, config.depth, config.num_heads, config.mlp_ratio,
           config.predictor_embed_dim, config.predictor_depth, config.predictor_num_heads, config.predictor_mlp_ratio)
    assert got == pytest.approx((224, patch, expected.embed_dim, expected.depth, 16, mlp_ratio, 384, predictor_depth,
                                 16, 4.0))
    assert (expected.embed_dim, expected.depth) == {"vit_huge": (1280, 32), "vit_giant": (1408, 40)}[arch]


def test_an_encoder_only_file_is_refused_by_the_app_with_the_reason(tmp_path, model):
    """A bare encoder (a timm-style export) loads for features, but the app needs the predictor and says so."""
    from ijepa.engine import Engine

    torch.save({f"module.{k}": v for k, v in model.encoder.state_dict().items()}, tmp_path / "encoder.pth")
    assert load_model(tmp_path / "encoder.pth").predictor is None
    with pytest.raises(ValueError, match="no predictor weights"):
        Engine.load(tmp_path / "encoder.pth", device="cpu")


# ----- the official key layout, from a manifest written from the official model definitions (not from our code) ---

def official_manifest(name: str) -> dict:
    """tests/fixtures/official_keys_*.json: the released file's state-dict names and shapes without 'module.'
    (written by tests/fixtures/make_official_keys.py from facebookresearch/ijepa's model definitions and configs)."""
    return json.loads((FIXTURES / f"official_keys_{name}.json").read_text())


def shapes(state_dict: dict) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state_dict.items()}


def assert_same_layout(ours: dict[str, list[int]], official: dict[str, list[int]], part: str):
    missing, extra = sorted(official.keys() - ours.keys()), sorted(ours.keys() - official.keys())
    assert not missing and not extra, \
        f"{part}: official names we lack {missing[:5]}, names the official lacks {extra[:5]}"
    wrong = {k: (ours[k], official[k]) for k in official if ours[k] != official[k]}
    assert not wrong, f"{part}: shapes (ours, official) differ: {dict(list(wrong.items())[:5])}"


@pytest.mark.parametrize("name, arch", [("vith14", "vit_huge"), ("vitg16", "vit_giant")])
def test_the_loader_expects_exactly_the_official_names_and_shapes(tmp_path, monkeypatch, name, arch):
    """An official file as the manifest describes it (meta tensors: no memory, no 10 GB download) goes through
    load_model's key mapping and strict load, and the model it builds has exactly the official names and shapes.
    Unlike the round trips above, this fails if our module names or shapes drift from the official ones."""
    manifest = official_manifest(name)
    official = {"encoder": manifest["encoder"], "target_encoder": manifest["encoder"],
                "predictor": manifest["predictor"]}
    raw = {part: {f"module.{k}": torch.empty(shape, device="meta") for k, shape in names.items()}
           for part, names in official.items()}
    raw.update({"opt": {"state": {}, "param_groups": []}, "scaler": None, "epoch": 300, "loss": 0.1,
                "batch_size": 128, "world_size": 16, "lr": 1e-3})
    path = tmp_path / "official.pth.tar"
    path.write_bytes(b"PK\x03\x04 stands in for the release; torch.load is replaced below")
    monkeypatch.setattr(ijepa.checkpoint, "load_weights_only", lambda p: raw)
    with torch.device("meta"):
        loaded = load_model(path)
        c = manifest["config"]
        built = IJepa(IJepaConfig.from_arch(c["model_name"], img_size=c["crop_size"], patch_size=c["patch_size"],
                                            predictor_depth=c["pred_depth"], predictor_embed_dim=c["pred_emb_dim"]))
    cfg = loaded.config
    assert (cfg.arch, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.img_size, cfg.grid_size) == \
        (arch, c["embed_dim"], c["depth"], c["num_heads"], c["patch_size"], c["crop_size"],
         (math.isqrt(c["num_patches"]),) * 2)
    assert (cfg.predictor_embed_dim, cfg.predictor_depth, cfg.predictor_num_heads, cfg.predictor_mlp_ratio) == \
        (c["pred_emb_dim"], c["pred_depth"], c["pred_num_heads"], 4.0)
    for model in (loaded, built):  # what the loader infers, and what from_arch builds for the released config
        for part, names in official.items():
            assert_same_layout(shapes(getattr(model, part).state_dict()), names, part)
    if name == "vith14":  # the released file's sizes (docs/reference notes): encoder 630.8M, predictor 22.4M
        count = lambda names: sum(math.prod(s) for s in names.values()) / 1e6  # noqa: E731
        assert (round(count(manifest["encoder"]), 1), round(count(manifest["predictor"]), 1)) == (630.8, 22.4)


def test_image_normalisation_is_the_official_imagenet_one(tmp_path, model):
    """The official transforms normalise with the ImageNet mean and std; official checkpoints load with them."""
    official = official_manifest("vith14")["normalization"]
    assert official == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert (list(IMAGENET_MEAN), list(IMAGENET_STD)) == (official["mean"], official["std"])
    write_official(tmp_path / "official.pth.tar", model)
    loaded = load_model(tmp_path / "official.pth.tar")
    assert (list(loaded.config.mean), list(loaded.config.std)) == (official["mean"], official["std"])
    mean, std = torch.tensor(official["mean"]).view(1, 3, 1, 1), torch.tensor(official["std"]).view(1, 3, 1, 1)
    images = torch.stack([mean.expand(1, 3, 2, 2)[0], (mean + std).expand(1, 3, 2, 2)[0]])
    out = loaded.normalize(images)
    torch.testing.assert_close(out[0], torch.zeros(3, 2, 2))
    torch.testing.assert_close(out[1], torch.ones(3, 2, 2))


# ----- checkpoints of other architectures say what they are, and name the file ----------------------------------

def foreign_encoder(model: IJepa, kind: str) -> dict[str, torch.Tensor]:
    state = dict(model.encoder.state_dict())
    width, rows = model.config.embed_dim, state["pos_embed"].shape[1]
    if kind in ("cls_token", "cls_rows"):  # DINO/MAE/timm classifier ViT: one more position row for the CLS token
        state["pos_embed"] = torch.zeros(1, rows + 1, width)
        if kind == "cls_token":
            state["cls_token"] = torch.zeros(1, 1, width)
    if kind in ("video", "vjepa"):  # V-JEPA: Conv3d patch embedding over (tubelet, patch, patch)
        state["patch_embed.proj.weight"] = torch.zeros(width, 3, 2, 4, 4)
    if kind in ("vjepa", "backbone"):  # V-JEPA's MultiMaskWrapper puts the encoder under 'backbone.'
        state = {f"backbone.{k}": v for k, v in state.items()}
    return {f"module.{k}": v for k, v in state.items()}


FOREIGN = {  # what each kind of file must be called
    "cls_token": r"has a CLS token \(cls_token\): a DINO/MAE/DeiT/CLIP or timm classifier ViT, not an I-JEPA encoder",
    "cls_rows": r"has a CLS token \(65 position rows = 64 patches \+ 1\).*not an I-JEPA encoder",
    "video": r"3-D patch embedding \(patch_embed.proj.weight \(192, 3, 2, 4, 4\).*video model such as V-JEPA, "
             r"not supported",
    "vjepa": r"sit under 'backbone.' with a 3-D patch embedding.*video model such as V-JEPA, not supported",
    "backbone": r"sit under 'backbone.' \(V-JEPA's MultiMaskWrapper layout\).*not an I-JEPA checkpoint",
}


@pytest.mark.parametrize("kind", FOREIGN)
@pytest.mark.parametrize("layout", ["official", "bare"])
def test_other_architectures_are_named_with_the_file(tmp_path, model, kind, layout):
    """Before: a raw ValueError (CLS token, 5-D patch weight) or a message without the file (V-JEPA's keys)."""
    encoder = foreign_encoder(model, kind)
    predictor = {f"module.{k}": v for k, v in model.predictor.state_dict().items()}
    payload = {"encoder": encoder, "target_encoder": encoder, "predictor": predictor} if layout == "official" \
        else encoder
    path = tmp_path / f"{kind}-{layout}.pth.tar"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: ")) as err:  # the file is named first
        load_model(path)
    assert err.match(FOREIGN[kind])


@pytest.mark.parametrize("config, message", [
    ({"architectures": ["IJepaModel"], "model_type": "ijepa", "hidden_size": 1280, "image_size": 224,
      "patch_size": 14, "transformers_version": "4.47.0"},
     r"a Hugging Face transformers config \('ijepa'\): transformers' IJepaModel holds only an encoder"),
    ({"architecture": "vit_huge_patch14_gap_224", "num_classes": 0, "num_features": 1280,
      "pretrained_cfg": {"tag": "in1k_ijepa"}}, r"a timm config \('vit_huge_patch14_gap_224'\)"),
], ids=["transformers", "timm"])
def test_a_hugging_face_or_timm_folder_is_not_taken_for_ours(tmp_path, config, message):
    """Before: 'not a valid I-JEPA config: unknown I-JEPA config fields', as if one of ours were damaged."""
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"embeddings.patch_embeddings.projection.weight": torch.zeros(4, 3, 2, 2)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"hub/config.json: not an I-JEPA model folder of this project") as err:
        load_model(folder)
    assert err.match(message) and err.match("official I-JEPA .pth.tar")


# ----- legacy (non-zip) torch.save files: truncated is told apart from 'not a checkpoint' ------------------------

def test_a_truncated_legacy_format_file_says_truncated(tmp_path, model):
    """Before: 'not a PyTorch checkpoint'. A legacy file opens with torch.save's pickled magic number, so a cut one
    is still recognised, wherever the cut falls: in the header, the pickled dicts or the tensor data."""
    full = tmp_path / "legacy.pth.tar"
    write_official(full, model, legacy=True)
    data = full.read_bytes()
    assert data[:4] != b"PK\x03\x04"
    for size in (8, 200, len(data) // 2, len(data) - 10):
        cut = tmp_path / f"cut-{size}.pth.tar"
        cut.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match=rf"{cut.name}: a PyTorch checkpoint in the legacy .*truncated"):
            load_model(cut)
    for ours, theirs in zip(outputs(load_model(full)), outputs(model)):  # the whole file loads
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_a_legacy_format_file_that_would_run_code_is_still_refused(tmp_path, model):
    path = tmp_path / "evil-legacy.pth.tar"
    write_official(path, model, legacy=True, epoch=Exploit())
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path)


def test_a_plain_pickle_is_not_called_truncated(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"encoder": [1, 2, 3]}, protocol=2))
    with pytest.raises(CheckpointError, match=r"plain.pkl: not a PyTorch checkpoint"):
        load_model(path)


# ----- a predictor without the context encoder it reads -------------------------------------------------------------

def test_target_encoder_and_predictor_without_encoder_leave_the_predictor_out(tmp_path, model, caplog):
    """The predictor was trained on context-encoder tokens; before, it silently got target-encoder tokens. Now the
    file loads for features (exactly the target encoder's) with a warning, and without a predictor."""
    path = tmp_path / "no-context.pth.tar"
    torch.save({"target_encoder": prefixed(model.target_encoder), "predictor": prefixed(model.predictor)}, path)
    with caplog.at_level(logging.WARNING, logger="ijepa.checkpoint"):
        loaded = load_model(path)
    assert loaded.predictor is None and not loaded.config.has_predictor
    assert "no-context.pth.tar has target_encoder and predictor weights but no encoder" in caplog.text
    assert "predictor is left out" in caplog.text
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.feature_encoder()(images), model.target_encoder(images), rtol=0, atol=0)
