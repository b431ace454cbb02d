"""One loader for official I-JEPA ``.pth.tar`` files and our safetensors + JSON format.

Official files are opened with ``torch.load(weights_only=True, mmap=True)``: tensors are memory-mapped, so the
optimizer state (half of the 10 GB ViT-H file) is never read, and a pickle that would run code is refused.
The architecture is inferred from tensor shapes; attention heads cannot be read from weights, so they follow the
released families' convention (``VIT_ARCHS``). Our own format is a folder with ``config.json`` (an
``IJepaConfig``) beside ``model.safetensors``: it rebuilds the model without flags.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import IJepa, IJepaConfig
from .pos_embed import grid_for
from .vision_transformer import VIT_ARCHS

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_TAG = "ijepa-visible/1"
DECODER_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # what diffusers' save_pretrained writes
PARTS = ("encoder", "target_encoder", "predictor")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with a message that says why and what to do."""


ACCEPTED = (f"an official I-JEPA .pth.tar file or one of our model folders ({CONFIG_NAME} + {WEIGHTS_NAME}, "
            f"e.g. assets/model)")


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's, in either order


def strip_prefix(state_dict: dict[str, torch.Tensor], prefixes: tuple[str, ...] = WRAPPER_PREFIXES
                 ) -> dict[str, torch.Tensor]:
    """Remove DDP/compile wrapper prefixes from every key that has them."""
    def bare(key: str) -> str:
        while key.startswith(prefixes):
            key = key[len(next(p for p in prefixes if key.startswith(p))):]
        return key
    return {bare(k): v for k, v in state_dict.items()}


def heads_for_width(width: int) -> int:
    for arch in VIT_ARCHS.values():
        if arch["embed_dim"] == width:
            return arch["num_heads"]
    return max(1, width // 64)


def arch_name(width: int, depth: int) -> str:
    for name, arch in VIT_ARCHS.items():
        if arch["embed_dim"] == width and arch["depth"] == depth:
            return name
    return f"vit_{width}x{depth}"


def _depth(state_dict: dict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def infer_config(encoder: dict[str, torch.Tensor], predictor: dict[str, torch.Tensor] | None) -> IJepaConfig:
    """Read the architecture off the tensor shapes of an official encoder (and predictor) state dict."""
    try:
        width, _, patch, _ = encoder["patch_embed.proj.weight"].shape
        grid = grid_for(encoder["pos_embed"].shape[1])
        depth = _depth(encoder, "blocks")
        mlp_ratio = encoder["blocks.0.mlp.fc1.weight"].shape[0] / width
    except KeyError as err:
        raise CheckpointError(f"not an I-JEPA/ViT encoder state dict: missing {err.args[0]!r}") from None
    num_heads = heads_for_width(width)
    config = IJepaConfig(img_size=grid[0] * patch, patch_size=patch, embed_dim=width, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, arch=arch_name(width, depth),
                         has_predictor=predictor is not None)
    if predictor is not None:
        try:
            config.predictor_embed_dim = predictor["predictor_embed.weight"].shape[0]
        except KeyError:
            raise CheckpointError("the predictor state dict has no 'predictor_embed.weight'") from None
        config.predictor_depth = _depth(predictor, "predictor_blocks")
        if "predictor_blocks.0.mlp.fc1.weight" in predictor:
            config.predictor_mlp_ratio = predictor["predictor_blocks.0.mlp.fc1.weight"].shape[0] / \
                config.predictor_embed_dim
        config.predictor_num_heads = num_heads  # official predictors use the encoder's head count
    return config


def _torch_load(path: Path) -> dict:
    """torch.load that only accepts plain tensors and containers, with readable failures."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch.save's zip archive, or its legacy pickle
        raise CheckpointError(f"{path}: not a PyTorch checkpoint; expected {ACCEPTED}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: the file holds Python objects beyond tensors and plain containers "
            f"(it would run code when unpickled). Only weights are accepted. Details: {str(err).splitlines()[0]}"
        ) from None
    except RuntimeError as err:
        text = str(err)
        if "mmap" in text:  # legacy (non-zip) torch.save format: cannot be memory-mapped
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as inner:
                raise CheckpointError(f"{path}: refused to load: {str(inner).splitlines()[0]}") from None
            except Exception:  # noqa: BLE001 - whatever torch says about a non-checkpoint, the answer is the same
                raise CheckpointError(f"{path}: not a PyTorch checkpoint; expected {ACCEPTED}") from None
        raise CheckpointError(
            f"{path}: cannot read this file as a PyTorch checkpoint; it is probably truncated or not a "
            f"checkpoint (download it again). Details: {text.splitlines()[0]}"
        ) from None
    except (EOFError, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: cannot read this file as a PyTorch checkpoint (truncated?): {err}") from None


def split_official(raw: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Official top-level dict -> {"encoder", "target_encoder", "predictor"} state dicts (prefixes stripped).

    Also accepts a bare encoder state dict (timm/HF-style export): then there is no predictor.
    """
    if not isinstance(raw, dict):
        raise CheckpointError(f"expected a dict of state dicts, found {type(raw).__name__}")
    if "encoder" not in raw and "target_encoder" not in raw:
        if {"model", "optimizer", "step"} <= set(raw):
            raise CheckpointError("a training checkpoint of train.pretrain: make a model folder of it with "
                                  "`python -m train.export_checkpoint <this file> --out <folder>` and load that")
        if any(k.endswith("patch_embed.proj.weight") for k in raw):
            return {"encoder": strip_prefix(raw)}
        raise CheckpointError(f"no 'encoder' or 'target_encoder' in this checkpoint (its keys: {sorted(raw)[:8]}); "
                              f"expected {ACCEPTED}")
    parts = {name: strip_prefix(raw[name]) for name in PARTS if isinstance(raw.get(name), dict)}
    parts.setdefault("encoder", parts.get("target_encoder"))
    if parts["encoder"] is None:
        found = {name: type(raw[name]).__name__ for name in PARTS if name in raw}
        raise CheckpointError(f"its encoder entries are not state dicts (found {found}); expected {ACCEPTED}")
    return parts


def _load_part(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], name: str, path: Path) -> None:
    expected = module.state_dict()
    unexpected = [k for k in state_dict if k not in expected]
    missing = [k for k in expected if k not in state_dict]
    if unexpected or missing:
        raise CheckpointError(
            f"{path}: the {name} does not match the inferred architecture: unexpected keys {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}, missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    for key, tensor in state_dict.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{path}: {name}.{key} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(expected[key].shape)}")
    module.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)


def load_official(path: str | Path) -> IJepa:
    """An official I-JEPA checkpoint (``.pth.tar``) -> IJepa. Optimizer state is ignored and never read."""
    path = Path(path)
    raw = _torch_load(path)
    try:
        parts = split_official(raw)
    except CheckpointError as err:  # split_official does not know the file: name it
        raise CheckpointError(f"{path}: {err}") from None
    config = infer_config(parts["encoder"], parts.get("predictor"))
    config.trained_on = "official I-JEPA release (see the file name for data and epochs)"
    model = IJepa(config)
    _load_part(model.encoder, parts["encoder"], "encoder", path)
    _load_part(model.target_encoder, parts.get("target_encoder", parts["encoder"]), "target_encoder", path)
    if model.predictor is not None:
        _load_part(model.predictor, parts["predictor"], "predictor", path)
    if "target_encoder" not in parts:
        logger.warning("%s has no target_encoder: using the context encoder for features", path)
    return model.eval()


def save_model(model: IJepa, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (optionally cast, e.g. fp16 to ship small)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": FORMAT_TAG})
    config = {"format": FORMAT_TAG, **model.config.to_dict()}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_ours(directory: str | Path) -> IJepa:
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not weights_path.is_file():  # a folder users often pass by mistake: say which one to pass
        if (directory / DECODER_WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{directory} is a sketch decoder folder: load it with --decoder; a checkpoint is "
                                  f"{ACCEPTED}")
        if (directory / "model" / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{directory} is a run or bundle folder: its model is {directory / 'model'}")
    for p in (config_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"{directory}: missing {p.name}; a model folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        data = json.loads(config_path.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, found {type(data).__name__}")
        data.pop("format", None)
        config = IJepaConfig.from_dict(data)
        model = IJepa(config)  # the architecture's own checks (e.g. a width the position table cannot use)
    except (json.JSONDecodeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{config_path}: not a valid I-JEPA config: {err}") from None
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights_path}: cannot read the weights (truncated or not safetensors): {err}") from None
    for name in PARTS:
        module = getattr(model, name)
        if module is None:
            continue
        part = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        _load_part(module, part, name, weights_path)
    extra = [k for k in tensors if k.split(".", 1)[0] not in PARTS or getattr(model, k.split(".", 1)[0]) is None]
    if extra:
        raise CheckpointError(f"{weights_path}: unexpected keys {extra[:5]}")
    return model.eval()


def load_model(path: str | Path, img_size: int | None = None) -> IJepa:
    """Load any supported checkpoint: our model folder (or its config.json/model.safetensors) or an official
    ``.pth``/``.pth.tar`` file. ``img_size`` runs the model at another resolution (position tables regenerated)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file() and path.name in (CONFIG_NAME, WEIGHTS_NAME):
        path = path.parent
    if path.is_dir():
        model = load_ours(path)
    elif path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    else:
        model = load_official(path)
    if img_size is not None and img_size != model.config.img_size:
        model.set_img_size(img_size)
    return model
