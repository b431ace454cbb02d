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
import os
import pickle
import pickletools
import re
import stat
import warnings
import zipfile
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .device import process_status
from .model import IJepa, IJepaConfig
from .pos_embed import grid_for
from .vision_transformer import VIT_ARCHS

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_TAG = "ijepa-visible/1"
DECODER_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # what diffusers' save_pretrained writes
PARTS = ("encoder", "target_encoder", "predictor")
RECIPE_BUNDLE_DIR = "bundle"  # where python -m train.default leaves a finished run's bundle, inside its --out-dir


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with a message that says why and what to do."""


# What every config.json this project has written holds (later fields, e.g. target_norm, default to what runs
# before them used).
ARCHITECTURE_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "predictor_embed_dim",
                     "predictor_depth", "predictor_num_heads")
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


def _is_square(n: int) -> bool:
    return n > 0 and int(round(n**0.5)) ** 2 == n


def _what_else(encoder: dict[str, torch.Tensor]) -> str | None:
    """Why ``encoder`` is not an I-JEPA image encoder, naming what it looks like instead; None if nothing tells."""
    patch = encoder.get("patch_embed.proj.weight")
    if patch is None:
        nested = sorted(k[: -len("patch_embed.proj.weight")] for k in encoder if k.endswith(".patch_embed.proj.weight"))
        if not nested:
            return None  # the missing key itself is the message
        prefix, shape = nested[0], tuple(encoder[nested[0] + "patch_embed.proj.weight"].shape)
        if len(shape) == 5:
            return (f"its encoder weights sit under {prefix!r} with a 3-D patch embedding (patch_embed.proj.weight "
                    f"{shape}, a Conv3d over frames): a video model such as V-JEPA, not supported")
        known = " (V-JEPA's MultiMaskWrapper layout)" if prefix == "backbone." else ""
        return (f"its encoder weights sit under {prefix!r}{known}, where an I-JEPA encoder's keys start at "
                f"'patch_embed.', 'pos_embed' and 'blocks.': not an I-JEPA checkpoint")
    shape = tuple(patch.shape)
    if len(shape) == 5:
        return (f"3-D patch embedding (patch_embed.proj.weight {shape}, a Conv3d over frames): a video model such "
                f"as V-JEPA, not supported")
    if len(shape) != 4 or shape[2] != shape[3]:
        return f"patch_embed.proj.weight has shape {shape}, not a square Conv2d patch embedding: not an I-JEPA encoder"
    pos = encoder.get("pos_embed")
    rows = pos.shape[1] if pos is not None and pos.dim() == 3 else None
    extra = [k for k in ("cls_token", "dist_token", "reg_token", "register_tokens") if k in encoder]
    if extra or (rows is not None and not _is_square(rows) and _is_square(rows - 1)):
        found = ", ".join(extra) if extra else f"{rows} position rows = {rows - 1} patches + 1"
        return (f"its encoder has a CLS token ({found}): a DINO/MAE/DeiT/CLIP or timm classifier ViT, not an I-JEPA "
                f"encoder (I-JEPA encoders have none)")
    if pos is not None and (pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != shape[0]):
        return f"pos_embed has shape {tuple(pos.shape)}, not [1, patches, {shape[0]}]: not an I-JEPA encoder"
    if rows is not None and not _is_square(rows):
        return f"its position table has {rows} rows, not a square patch grid: not an I-JEPA encoder"
    return None


def infer_config(encoder: dict[str, torch.Tensor], predictor: dict[str, torch.Tensor] | None) -> IJepaConfig:
    """Read the architecture off the tensor shapes of an official encoder (and predictor) state dict.

    Raises CheckpointError (without the file's name: callers add it) for encoders of other architectures,
    saying what they look like (a ViT with a CLS token, a video model, ...)."""
    reason = _what_else(encoder)
    if reason is not None:
        raise CheckpointError(f"{reason}; expected {ACCEPTED}")
    try:
        width, _, patch, _ = encoder["patch_embed.proj.weight"].shape
        grid = grid_for(encoder["pos_embed"].shape[1])
        depth = _depth(encoder, "blocks")
        mlp_ratio = encoder["blocks.0.mlp.fc1.weight"].shape[0] / width
    except KeyError as err:
        raise CheckpointError(f"not an I-JEPA/ViT encoder state dict: missing {err.args[0]!r}") from None
    except (ValueError, IndexError) as err:  # _what_else should have caught these shapes; still say where it failed
        raise CheckpointError(f"not an I-JEPA/ViT encoder state dict: {err}") from None
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


# torch.save's legacy (non-zip) format opens with a pickled magic number: LONG1 opcode, 10 bytes, little-endian
LEGACY_MARKER = b"\x8a\x0a" + torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")


def _is_legacy_torch_file(head: bytes) -> bool:
    """True when ``head`` (the file's first bytes) is the start of a legacy torch.save file, even a cut one."""
    return LEGACY_MARKER in head[:64] or (0 < len(head) < 16 and (b"\x80\x02" + LEGACY_MARKER).startswith(head))


def _legacy_pickles_whole(path: Path) -> bool:
    """Whether the five pickles that open a legacy torch.save file (magic number, protocol, system info, the object,
    the storage keys) are all whole. pickletools only parses opcodes: nothing in the file is run."""
    try:
        with open(path, "rb") as f:
            for _ in range(5):
                for _ in pickletools.genops(f):  # stops after STOP, raises when the file ends first
                    pass
    except Exception:  # noqa: BLE001 - a cut opcode fails in several ways; all mean "not whole"
        return False
    return True


def _refusal_detail(err: Exception) -> str:
    """What torch's weights-only refusal names as refused ("Trying to load unsupported GLOBAL posix.system ...",
    "Unsupported operand 149"), without the advice around it, which is for torch's own users (re-run with
    weights_only=False, file an issue, read the docs), not ours."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    marker = "WeightsUnpickler error:"
    facts = [line.split(marker, 1)[1].strip() if marker in line else line for line in lines
             if not line.startswith(("Weights only load failed", "Check the documentation"))]
    return next((fact for fact in facts if fact), lines[0] if lines else type(err).__name__)


def _refused(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: refused to load: the file holds Python objects beyond tensors and plain containers "
        f"(it would run code when unpickled). Only weights are accepted. Details: {_refusal_detail(err)}")


def _torch_load(path: Path, mmap: bool) -> dict:
    with warnings.catch_warnings():
        # a pickle of another protocol than torch.save's: torch warns (and asks for an issue) before it refuses or
        # reads the file; what we then say, or load, is the whole story
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def load_weights_only(path: Path, expected: str = ACCEPTED, mmap: bool = True,
                      remedy: str = "download it again") -> dict:
    """torch.load that only accepts plain tensors and containers, with readable failures (CheckpointError, saying
    what was ``expected``, and the ``remedy`` for a damaged file). ``mmap``: map the weights instead of reading them
    (a training checkpoint is not mapped: pruning old checkpoints deletes files, which Windows refuses while they are
    mapped)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip archive, or its legacy pickle
        raise CheckpointError(f"{path}: not a PyTorch checkpoint; expected {expected}")
    try:
        raw = _torch_load(path, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise _refused(path, err) from None
    except RuntimeError as err:
        text = str(err)
        if "mmap" in text:  # legacy (non-zip) torch.save format: cannot be memory-mapped
            try:
                return _torch_load(path, mmap=False)
            except Exception as inner:  # noqa: BLE001 - EOFError, RuntimeError, struct.error, IndexError, ...
                legacy = _is_legacy_torch_file(head)
                if isinstance(inner, pickle.UnpicklingError):
                    # a cut inside a pickled name reads as a refused global: an unfinished pickle tells them apart
                    if not legacy or _legacy_pickles_whole(path):
                        raise _refused(path, inner) from None
                    detail = "its pickled part ends early"
                else:
                    detail = (str(inner).splitlines() or [""])[0] or type(inner).__name__
                if not legacy:  # some other pickle: whatever torch says, the answer is the same
                    raise CheckpointError(f"{path}: not a PyTorch checkpoint; expected {expected}") from None
                raise CheckpointError(
                    f"{path}: a PyTorch checkpoint in the legacy (non-zip) torch.save format that cannot be read to "
                    f"the end: it is truncated or damaged ({remedy}). Details: {detail}"
                ) from None
        raise CheckpointError(
            f"{path}: cannot read this file as a PyTorch checkpoint; it is probably truncated or not a "
            f"checkpoint ({remedy}). Details: {text.splitlines()[0]}"
        ) from None
    except (EOFError, ValueError, OSError) as err:
        raise CheckpointError(
            f"{path}: cannot read this file as a PyTorch checkpoint; it is probably truncated ({remedy}): {err}"
        ) from None
    if mmap and head[:4] == b"PK\x03\x04":
        _check_zip_headers(path, remedy)
    return raw


def _check_zip_headers(path: Path, remedy: str) -> None:
    """Mapped, torch reads each tensor at the offset the archive's directory gives and never looks at the entry's
    own header, so a file with a zeroed stretch (a download that pre-allocated the file and then stopped) loads as
    zeros. Read without mapping, torch checks those headers and refuses it; this is the same check, and reads only
    the headers. Like torch, it does not check the checksums: that would read the whole file, optimizer state
    included, so a stretch that falls inside one tensor's data is not caught."""
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                with archive.open(entry):
                    pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CheckpointError(
            f"{path}: a PyTorch checkpoint with damaged parts: it is truncated or damaged ({remedy}). Details: {err}"
        ) from None


def split_official(raw: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Official top-level dict -> the state dicts it has of "encoder", "target_encoder", "predictor" (prefixes
    stripped); at least one of the two encoders is there. ``load_official`` decides what stands in for a missing one.

    Also accepts a bare encoder state dict (timm/HF-style export): then there is no predictor.
    """
    if not isinstance(raw, dict):
        raise CheckpointError(f"expected a dict of state dicts, found {type(raw).__name__}")
    if "encoder" not in raw and "target_encoder" not in raw:
        if {"model", "optimizer", "step"} <= set(raw):
            raise CheckpointError("a training checkpoint of train.pretrain: make a model folder of it with "
                                  "`python -m train.export_checkpoint <this file> --out <folder>` and load that")
        bare = strip_prefix(raw)
        if any(k.startswith(("encoder.", "target_encoder.")) for k in bare):
            raise CheckpointError("the flat state dict of a whole I-JEPA model (keys under 'encoder.', "
                                  "'target_encoder.', 'predictor.'), which does not say how the model was built: "
                                  "save it with ijepa.save_model(model, folder) and load that folder")
        if any(k.endswith("patch_embed.proj.weight") for k in bare):
            return {"encoder": bare}
        raise CheckpointError(f"no 'encoder' or 'target_encoder' in this checkpoint (its keys: {sorted(raw)[:8]}); "
                              f"expected {ACCEPTED}")
    parts = {name: strip_prefix(raw[name]) for name in PARTS if isinstance(raw.get(name), dict)}
    if "encoder" not in parts and "target_encoder" not in parts:
        found = {name: type(raw[name]).__name__ for name in PARTS if name in raw}
        raise CheckpointError(f"its encoder entries are not state dicts (found {found}); expected {ACCEPTED}")
    return parts


def _empty_model(config: IJepaConfig) -> IJepa:
    """The model's modules without weights (meta device): loading assigns every tensor, so a ViT-H does not first
    fill 1.3 G random values that are thrown away."""
    with torch.device("meta"):
        return IJepa(config)


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
    # assign: the module was built on the meta device, so the loaded tensors become its weights (no copy)
    module.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True, assign=True)


def load_official(path: str | Path) -> IJepa:
    """An official I-JEPA checkpoint (``.pth.tar``) -> IJepa. Optimizer state is ignored and never read.

    A file without ``target_encoder`` uses its context encoder for both. A file without ``encoder`` (the context
    encoder) uses its target encoder for both and leaves its predictor out: the predictor was trained on
    context-encoder tokens and every predictor path here feeds it ``model.encoder``, so keeping it would silently
    predict from the wrong encoder; features (target encoder) stay exact.
    """
    path = Path(path)
    raw = load_weights_only(path)
    try:
        parts = split_official(raw)
        encoder, target, predictor = parts.get("encoder"), parts.get("target_encoder"), parts.get("predictor")
        if encoder is None and predictor is not None:
            logger.warning(
                "%s has target_encoder and predictor weights but no encoder (the context encoder the predictor was "
                "trained to read): the predictor is left out, so this model gives target-encoder features but no "
                "predictions. For predictions, use a file that keeps 'encoder' (the official releases do).", path)
            predictor = None
        config = infer_config(encoder if encoder is not None else target, predictor)
    except CheckpointError as err:  # split_official and infer_config do not know the file: name it
        raise CheckpointError(f"{path}: {err}") from None
    config.trained_on = "official I-JEPA release (see the file name for data and epochs)"
    if target is None:  # said where the app shows it: the paper's features are the target encoder's
        config.trained_on += ("; the file has no target_encoder, so the context encoder stands in for it (the "
                              "features and the truth the predictions are compared with)")
    model = _empty_model(config)
    copy_of = lambda part: {k: v.clone() for k, v in part.items()}  # one file part for both: no shared storage
    _load_part(model.encoder, encoder if encoder is not None else copy_of(target), "encoder", path)
    _load_part(model.target_encoder, target if target is not None else copy_of(encoder), "target_encoder", path)
    if model.predictor is not None:
        _load_part(model.predictor, predictor, "predictor", path)
    if target is None:
        logger.warning("%s has no target_encoder: using the context encoder for features", path)
    return model.eval()


def share_as_umask_allows(path: str | Path) -> None:
    """Give the file ``path``, or every file under the folder ``path``, the read and write bits a plain ``open``
    gives (0666 less the umask). Why: safetensors, and so diffusers' ``save_pretrained``, writes its files 0600,
    and a model saved on a shared machine could then be read by its owner only."""
    mask = _umask()
    path = Path(path)
    for file in path.rglob("*") if path.is_dir() else [path]:
        if file.is_file() and not file.is_symlink():
            os.chmod(file, stat.S_IMODE(file.stat().st_mode) | (0o666 & ~mask))


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (``os.umask`` alone must set one to read
    it, which for a moment changes it for every thread)."""
    shown = process_status("Umask")
    if shown is not None:
        return int(shown, 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` with the permissions a plain ``open`` gives (``share_as_umask_allows``)."""
    save_file(tensors, path, metadata=metadata)
    share_as_umask_allows(path)


def save_model(model: IJepa, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (optionally cast, e.g. fp16 to ship small)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    save_safetensors(tensors, directory / WEIGHTS_NAME, metadata={"format": FORMAT_TAG})
    config = {"format": FORMAT_TAG, **model.config.to_dict()}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _describe_config(data: dict) -> str:
    """What program a foreign config.json comes from, as far as its fields tell."""
    if {"model_type", "architectures", "transformers_version"} & data.keys():
        kind = data.get("model_type") or data.get("architectures")
        text = f"is a Hugging Face transformers config ({kind!r})"
        if data.get("model_type") == "ijepa":
            text += (": transformers' IJepaModel holds only an encoder (no predictor); for the full model load the "
                     "official .pth.tar")
        return text
    if {"architecture", "pretrained_cfg", "num_classes"} & data.keys():
        return f"is a timm config ({data.get('architecture', 'architecture not named')!r})"
    if "_class_name" in data:
        return f"is a diffusers config ({data['_class_name']!r})"
    return f"has fields this project does not write ({sorted(data)[:6]})"


def recipe_bundle_hint(folder: str | Path) -> str:
    """" (... its bundle is X)" when ``folder`` is the out-dir of a finished train.default run, else "": users pass
    the out-dir where a bundle is asked for."""
    bundle = Path(folder) / RECIPE_BUNDLE_DIR
    if (bundle / "model" / WEIGHTS_NAME).is_file():
        return f" ({folder} is the out-dir of python -m train.default: its bundle is {bundle})"
    return ""


def load_ours(directory: str | Path) -> IJepa:
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not weights_path.is_file():  # a folder users often pass by mistake: say which one to pass
        if (directory / DECODER_WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{directory} is a sketch decoder folder, not a model (the app takes it with "
                                  "--decoder, beside the model it decodes); a model is "
                                  f"{ACCEPTED}")
        recipe = "the out-dir of python -m train.default"
        for inner, what in (("model", "a run or bundle folder"), (f"{RECIPE_BUNDLE_DIR}/model", recipe),
                            ("pretrain/model", recipe)):
            if (directory / inner / WEIGHTS_NAME).is_file():
                raise CheckpointError(f"{directory} is {what}: its model is {directory / inner}")
    for p in (config_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"{directory}: missing {p.name}; a model folder holds {CONFIG_NAME} and "
                                  f"{WEIGHTS_NAME}")
    try:
        data = json.loads(config_path.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, found {type(data).__name__}")
    except (ValueError, TypeError) as err:  # bad JSON (JSONDecodeError), not UTF-8, not an object
        raise CheckpointError(f"{config_path}: not a valid I-JEPA config: {err}") from None
    tag = data.pop("format", None)
    if tag is None and data.keys() - {f.name for f in fields(IJepaConfig)}:  # untagged, with fields we never write
        raise CheckpointError(
            f"{config_path}: not an I-JEPA model folder of this project (ours are written by save_model and tagged "
            f"\"format\": \"{FORMAT_TAG}\"): this {CONFIG_NAME} {_describe_config(data)}. Expected {ACCEPTED}")
    missing = [key for key in ARCHITECTURE_KEYS if key not in data]
    if missing:  # the defaults would build another network and blame the weights for not fitting it
        raise CheckpointError(f"{config_path} lacks {', '.join(missing)}: every model folder's {CONFIG_NAME} names "
                              "its architecture (save_model writes them all); restore the file from the run or bundle")
    try:
        config = IJepaConfig.from_dict(data)
        model = _empty_model(config)  # the architecture's own checks (e.g. a width the position table cannot use)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{config_path}: not a valid I-JEPA config: {err}") from None
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights_path}: cannot read the weights (truncated or not safetensors): "
                              f"{err}") from None
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
