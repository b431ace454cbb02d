"""Evaluate frozen I-JEPA features: kNN and linear probe vs raw pixels and a random-init encoder, plus
predictor semantics (a probe trained on TRUE box features, applied to the PREDICTOR's outputs).

    python -m train.eval --checkpoint runs/tiny/model --out-dir runs/tiny/eval            # emoji protocol
    python -m train.eval --checkpoint IN1K-vit.h.14-300e.pth.tar --data /path/to/class/folders  # class sub-folders

Emoji protocol (fixed so figures compare across runs): one centred emoji per image on a random background;
bank = every training base emoji, queries = every HELD-OUT base emoji (2 copies each); labels = Unicode group
and subgroup; kNN k=20, cosine similarity, votes weighted by exp(similarity / 0.07).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ijepa.checkpoint import load_model, save_safetensors
from ijepa.device import resolve_device
from ijepa.inference import encode, gather, predict_features, true_features
from ijepa.masks import complement_indices, pooled, rectangle_indices
from ijepa.model import IJepa, IJepaConfig
from train.config import doc_summary, run_command
from train.data import StackFields, require_data_source
from train.runtime import write_json_atomic

logger = logging.getLogger("train.eval")
# An image folder's raw-pixel baseline is read at most this many pixels on a side (area-averaged), as tiny-image
# baselines are: 224 px photos would keep 600 KB per image (770 GB for ImageNet's 1.28M) and a 150,528-wide probe
FOLDER_PIXEL_SIDE = 32


# ----- feature extraction --------------------------------------------------------------------------------------

def collect(dataset: Dataset, keys: tuple[str, ...], batch_size: int = 256):
    """Iterate a dataset in batches (in this process), yielding dicts of stacked tensors for ``keys``; a progress
    bar on a terminal (an image folder can take hours)."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=StackFields(keys))
    yield from tqdm(loader, desc="features", unit="batch", leave=False, disable=None)


@torch.no_grad()
def _pool(model: IJepa | None, dataset: Dataset, label_keys: tuple[str, ...], which: str = "target",
          batch_size: int = 256, device: str = "cpu", with_object_only: bool = False, pixel_side: int | None = None
          ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """One pass over the dataset: whole-image pooled features, optionally object-only ones, and labels. Raw pixels
    (model None) are area-averaged down to ``pixel_side`` first where the images are larger."""
    whole, objects, labels = [], [], {k: [] for k in label_keys}
    keys = ("image", "patch_emoji") + label_keys if with_object_only else ("image",) + label_keys
    for batch in collect(dataset, keys, batch_size):
        images = batch["image"].to(device)
        on_object = (batch["patch_emoji"] >= 0).to(device) if with_object_only else None
        if model is None:
            if pixel_side is not None and images.shape[-1] > pixel_side:
                images = F.adaptive_avg_pool2d(images, pixel_side)
            whole.append(images.flatten(1).cpu())
            if on_object is not None:
                patch = images.shape[-1] // on_object.shape[-1]
                pixels = on_object.repeat_interleave(patch, 1).repeat_interleave(patch, 2)
                objects.append((images * pixels.unsqueeze(1)).flatten(1).cpu())
        else:
            tokens = encode(model, images, which).float()
            whole.append(pooled(tokens).cpu())
            if on_object is not None:
                objects.append(pooled(tokens, on_object.flatten(1)).cpu())
        for k in label_keys:
            labels[k].append(batch[k])
    return (torch.cat(whole), torch.cat(objects) if with_object_only else None,
            {k: torch.cat(v) for k, v in labels.items()})


def pooled_features(model: IJepa | None, dataset: Dataset, label_keys: tuple[str, ...], which: str = "target",
                    batch_size: int = 256, device: str = "cpu", object_only: bool = False,
                    pixel_side: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Average-pooled encoder features (or flattened pixels when model is None) and labels of a whole dataset.

    ``object_only`` (a diagnostic, emoji datasets only) pools over the patches an emoji covers (an encoder still
    sees the whole image; raw pixels keep only the emoji's): it shows how much of a gap comes from the background
    diluting the average.
    """
    whole, objects, labels = _pool(model, dataset, label_keys, which, batch_size, device, object_only, pixel_side)
    return (objects if object_only else whole), labels


def random_init_like(config: IJepaConfig, seed: int, device: str) -> IJepa:
    """A model of this architecture, freshly initialised with a seed no training run uses (training seeds the init
    with its --seed, so reusing it would reproduce the trained model's starting point)."""
    torch.manual_seed(10_000_019 + seed)
    return IJepa(config).to(device).eval()


# ----- classifiers ---------------------------------------------------------------------------------------------

def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
             num_classes: int, k: int = 20, temperature: float = 0.07, block_elements: int = 2**26) -> float:
    """Weighted kNN (cosine similarity, votes exp(sim / T)), top-1 accuracy in percent.

    Similarities are computed ``block_elements`` at a time (256 MB in float32), so ImageNet-size sets fit."""
    bank, queries = F.normalize(bank.float(), dim=1), F.normalize(queries.float(), dim=1)
    chunk = max(1, block_elements // bank.size(0))  # query rows per block
    correct = 0
    for start in range(0, queries.size(0), chunk):
        top_sims, top_idx = (queries[start:start + chunk] @ bank.T).topk(min(k, bank.size(0)), dim=1)
        votes = torch.zeros(top_idx.size(0), num_classes)
        votes.scatter_add_(1, bank_labels[top_idx], (top_sims / temperature).exp())
        correct += (votes.argmax(dim=1) == query_labels[start:start + chunk]).sum().item()
    return 100.0 * correct / queries.size(0)


class LinearProbe(nn.Module):
    """Standardise features with the training statistics, then one linear layer."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features.float() - self.mean) / self.std)


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 300,
                     lr: float = 0.01, weight_decay: float = 1e-3, seed: int = 0) -> LinearProbe:
    """Full-batch softmax regression with AdamW: deterministic, a second or two on a CPU."""
    torch.manual_seed(seed)
    probe = LinearProbe(features.size(1), num_classes)
    probe.mean.copy_(features.float().mean(0))
    probe.std.copy_(features.float().std(0).clamp_min(1e-6))
    optimizer = torch.optim.AdamW(probe.linear.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(probe(features), labels).backward()
        optimizer.step()
    return probe.eval()


@torch.no_grad()
def accuracy(probe: LinearProbe, features: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (probe(features).argmax(1) == labels).float().mean().item()


def save_probe(probe: LinearProbe, label_names: list[str], path: Path, **metadata) -> None:
    """``<path>.safetensors`` weights + ``<path>.json`` label names, for the app's readout panel."""
    save_safetensors({k: v.contiguous() for k, v in probe.state_dict().items()}, path.with_suffix(".safetensors"))
    path.with_suffix(".json").write_text(json.dumps({"labels": label_names, **metadata}, indent=2) + "\n")


# ----- the emoji protocol --------------------------------------------------------------------------------------

def knn_scores(bank, bank_labels, queries, query_labels, num_classes: dict[str, int]) -> dict:
    return {f"knn_{level}": knn_top1(bank, bank_labels[level], queries, query_labels[level], n)
            for level, n in num_classes.items()}


def score(bank, bank_labels, queries, query_labels, num_classes: dict[str, int]) -> dict:
    out = knn_scores(bank, bank_labels, queries, query_labels, num_classes)
    for level, n in num_classes.items():
        probe = fit_linear_probe(bank, bank_labels[level], n)
        out[f"linear_{level}"] = accuracy(probe, queries, query_labels[level])
    return out


FEATURE_SOURCES = ("raw_pixels", "random_init", "target_encoder", "context_encoder")


def catalog_matches(config: IJepaConfig, fingerprint: str) -> bool | None:
    """Whether this machine's emoji catalog is the one the model trained on (None: the model does not say).

    The held-out split follows the emoji-test.txt version, the font and Pillow's layout engine: on another machine
    some "held-out" emoji may be ones the model trained on, so the figures would not be held-out figures."""
    if not config.data_fingerprint:
        return None
    if config.data_fingerprint != fingerprint:
        logger.warning("this machine's emoji catalog (%s) is not the one the model trained on (%s): its held-out "
                       "split differs (another emoji-test.txt, font or Pillow layout engine), so some held-out "
                       "queries may be emoji the model trained on", fingerprint, config.data_fingerprint)
        return False
    return True


def evaluate_emoji_features(model: IJepa, seed: int = 0, device: str = "cpu",
                            sources: tuple[str, ...] = FEATURE_SOURCES) -> dict:
    """kNN and linear probe on held-out emoji for: raw pixels, a random-init encoder, target and context encoders
    (or the subset named in ``sources``)."""
    unknown = set(sources) - set(FEATURE_SOURCES)
    if unknown:
        raise ValueError(f"unknown feature sources {sorted(unknown)}; choose from {FEATURE_SOURCES}")
    bank_set, query_set, num_classes, catalog = emoji_probe_sets(model.config.img_size, model.config.patch_size, seed)
    keys = tuple(num_classes)
    random_model = random_init_like(model.config, seed, device) if "random_init" in sources else None
    extractors = {"raw_pixels": (None, "target"), "random_init": (random_model, "target"),
                  "target_encoder": (model, "target"), "context_encoder": (model, "context")}
    results = {"protocol": "emoji held-out kNN k=20 T=0.07 + linear probe", "bank_size": len(bank_set),
               "query_size": len(query_set), "catalog": catalog.fingerprint,
               "catalog_matches_training": catalog_matches(model.config, catalog.fingerprint), "features": {},
               "object_patches_only": {}}  # a diagnostic beside the protocol: pooled over the emoji's own patches
    for name in sources:
        source, which = extractors[name]
        with_objects = name != "context_encoder"
        bank, bank_objects, bank_labels = _pool(source, bank_set, keys, which, device=device,
                                                with_object_only=with_objects)
        queries, query_objects, query_labels = _pool(source, query_set, keys, which, device=device,
                                                      with_object_only=with_objects)
        results["features"][name] = score(bank, bank_labels, queries, query_labels, num_classes)
        logger.info("%s: %s", name, results["features"][name])
        if with_objects:
            results["object_patches_only"][name] = knn_scores(bank_objects, bank_labels, query_objects,
                                                              query_labels, num_classes)
    return results


def emoji_probe_sets(img_size: int, patch_size: int, seed: int = 0) -> tuple[list, list, dict[str, int], object]:
    """The protocol's bank (every training base emoji) and queries (every held-out one), rendered once and kept in
    memory (~0.2 GB at 64 px) so every feature source reads the same images; plus the label counts and catalog."""
    from train.emoji import EmojiProbeSet, get_catalog

    catalog = get_catalog()
    bank_set, query_set = (list(EmojiProbeSet(catalog, split=split, resolution=img_size, patch_size=patch_size,
                                              seed=s)) for split, s in (("train", seed), ("heldout", seed + 1)))
    num_classes = {"group": len(catalog.group_names), "subgroup": len(catalog.subgroup_names)}
    return bank_set, query_set, num_classes, catalog


class HeldOutKnn:
    """The protocol's kNN figures for a model in the middle of training, in seconds: a falling loss does not say
    whether the features are learning kinds (a collapsed run's loss falls fastest), the held-out kNN does.

    Scores the target encoder's whole-image features (the protocol's figure) and its emoji-only patches, with
    raw pixels and a random-init encoder scored once as the lines to beat. kNN only (no linear probe), in fp32,
    so the last figure equals what ``train.eval`` reports for the exported model. The global RNG is left as it was,
    so a monitored run trains exactly like an unmonitored one.
    """
    FIGURES = ("knn_group", "knn_subgroup", "object_knn_group", "object_knn_subgroup")  # what a call returns

    def __init__(self, config: IJepaConfig, seed: int = 0, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.bank_set, self.query_set, self.num_classes, _ = emoji_probe_sets(config.img_size, config.patch_size,
                                                                              seed)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            random_model = random_init_like(config, seed, self.device)
        self.baselines = {"raw_pixels": self._score(None), "random_init": self._score(random_model)}

    @torch.no_grad()
    def _score(self, model: IJepa | None) -> dict[str, float]:
        keys = tuple(self.num_classes)
        bank, bank_objects, bank_labels = _pool(model, self.bank_set, keys, device=self.device,
                                                with_object_only=True)
        queries, query_objects, query_labels = _pool(model, self.query_set, keys, device=self.device,
                                                     with_object_only=True)
        whole = knn_scores(bank, bank_labels, queries, query_labels, self.num_classes)
        objects = knn_scores(bank_objects, bank_labels, query_objects, query_labels, self.num_classes)
        return {**whole, **{f"object_{name}": value for name, value in objects.items()}}

    def __call__(self, model: IJepa) -> dict[str, float]:
        """``FIGURES`` in percent; ``model`` keeps its mode."""
        was_training = model.training
        model.eval()  # no stochastic depth while scoring
        try:
            return self._score(model)
        finally:
            model.train(was_training)


# ----- predictor semantics on boxes ----------------------------------------------------------------------------

@dataclass
class BoxSet:
    """Pooled box features with labels: true (target encoder) and predicted (predictor from context only)."""
    true: torch.Tensor
    predicted: torch.Tensor
    group: torch.Tensor
    subgroup: torch.Tensor
    images: torch.Tensor | None = None  # [n, 3, H, W] crops' source images, kept only when asked
    boxes: torch.Tensor | None = None  # [n, 4] patch boxes (row0, col0, rows, cols)


def labelled_boxes(patch_labels: torch.Tensor, rows: int, cols: int, rng: np.random.Generator,
                   min_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One rows x cols patch box per image, centred on a random patch of some emoji; its label is the emoji
    covering most of the box (kept only when it covers >= min_fraction).
    Returns (origins [B, 2] as (row, col), base emoji ids [B], keep [B])."""
    b, gh, gw = patch_labels.shape
    origins, keep = torch.zeros(b, 2, dtype=torch.long), torch.zeros(b, dtype=torch.bool)
    labels = torch.full((b,), -1, dtype=torch.long)
    for i in range(b):
        fg = torch.nonzero(patch_labels[i] >= 0)
        if len(fg) == 0:
            continue
        r, c = fg[rng.integers(len(fg))].tolist()
        r0 = int(np.clip(r - rows // 2, 0, gh - rows))
        c0 = int(np.clip(c - cols // 2, 0, gw - cols))
        window = patch_labels[i, r0:r0 + rows, c0:c0 + cols].flatten()
        values, counts = window[window >= 0].unique(return_counts=True)
        if len(values) and counts.max().item() >= min_fraction * window.numel():
            origins[i] = torch.tensor([r0, c0])
            labels[i] = values[counts.argmax()]
            keep[i] = True
    return origins, labels, keep


@torch.no_grad()
def box_features(model: IJepa, images: torch.Tensor, origins: torch.Tensor, rows: int, cols: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of one rows x cols patch box per image ([B, 2] origins as (row, col)): the TRUE ones (target
    encoder on the whole image) and the PREDICTOR's, computed from the patches outside the box only."""
    grid = model.config.grid_size
    targets = rectangle_indices(origins, rows, cols, grid).to(images.device)
    contexts = complement_indices(targets, grid[0] * grid[1])
    truth = pooled(gather(true_features(model, images), targets))
    guess = pooled(predict_features(model, images, contexts, [targets])[0])
    return truth, guess


@torch.no_grad()
def sample_box_features(model: IJepa, split: str, count: int, seed: int, batch_size: int = 64,
                        device: str = "cpu", keep_images: bool = False) -> BoxSet:
    """Boxes on emoji scenes (sizes from ~6% to ~25% of the image, varied aspect), each dominated by one emoji."""
    from train.emoji import EmojiScenes, get_catalog

    catalog = get_catalog()
    grid = model.config.grid_size
    scenes = EmojiScenes(catalog, resolution=model.config.img_size, patch_size=model.config.patch_size,
                         split=split, seed=seed)
    rng = np.random.default_rng(seed)
    sizes = [(max(1, round(side / 4)), max(2, round(side / 2))) for side in grid]  # box rows, then columns
    parts: dict[str, list] = {"true": [], "predicted": [], "group": [], "subgroup": [], "images": [], "boxes": []}
    collected, index = 0, 0
    progress = tqdm(total=count, desc=f"boxes ({split})", leave=False)
    while collected < count:
        items = [scenes[index + j] for j in range(batch_size)]
        index += batch_size
        images = torch.stack([it["image"] for it in items]).to(device)
        patch_labels = torch.stack([it["patch_emoji"] for it in items])
        rows, cols = (int(rng.integers(lo, hi + 1)) for lo, hi in sizes)
        origins, majority, keep = labelled_boxes(patch_labels, rows, cols, rng)
        if not keep.any():
            continue
        images, origins, majority = images[keep], origins[keep], majority[keep]
        truth, guess = box_features(model, images, origins, rows, cols)
        parts["true"].append(truth.float().cpu())
        parts["predicted"].append(guess.float().cpu())
        parts["group"].append(catalog.group_of[majority])
        parts["subgroup"].append(catalog.subgroup_of[majority])
        parts["boxes"].append(torch.cat([origins, torch.tensor([[rows, cols]]).expand(len(origins), -1)], dim=1))
        if keep_images:
            parts["images"].append(images.cpu())
        collected += len(origins)
        progress.update(len(origins))
    progress.close()
    cat = {k: torch.cat(v)[:count] if v else None for k, v in parts.items()}
    return BoxSet(cat["true"], cat["predicted"], cat["group"], cat["subgroup"], cat["images"], cat["boxes"])


def evaluate_predictor_semantics(model: IJepa, num_train: int = 3000, num_test: int = 1000, seed: int = 0,
                                 device: str = "cpu") -> tuple[dict, dict[str, LinearProbe]]:
    """Fit probes on TRUE box features of training scenes; score them on true and PREDICTED features of new
    scenes (training emoji, and held-out emoji). ratio = predicted accuracy / true accuracy."""
    from train.emoji import get_catalog

    catalog = get_catalog()
    fit = sample_box_features(model, "train", num_train, seed=seed + 1000, device=device)
    tests = {"new_scenes": sample_box_features(model, "train", num_test, seed=seed + 2000, device=device),
             "heldout_emoji": sample_box_features(model, "heldout", num_test, seed=seed + 3000, device=device)}
    results, probes = {}, {}
    for level, n in (("group", len(catalog.group_names)), ("subgroup", len(catalog.subgroup_names))):
        probe = probes[level] = fit_linear_probe(fit.true, getattr(fit, level), n)
        for name, test in tests.items():
            true_acc = accuracy(probe, test.true, getattr(test, level))
            pred_acc = accuracy(probe, test.predicted, getattr(test, level))
            results[f"{name}_{level}"] = {"true_acc": true_acc, "predicted_acc": pred_acc,
                                          "ratio": pred_acc / true_acc if true_acc > 0 else 0.0}
    return results, probes


# ----- image folders -------------------------------------------------------------------------------------------

def _split_folders(root: Path) -> tuple[Path, Path | None] | None:
    """root/train/ and the held-out folder beside it (val/, valid/, validation/ or test/, preferred in that order;
    any case), or None when root has no such pair. A held-out folder without class sub-folders (a competition's
    unlabelled test/) is passed over; with none left, (train/, None): train/ alone, split 80/20."""
    from train.data import HELDOUT_SPLIT_NAMES

    folders = {d.name.lower(): d for d in sorted(root.iterdir()) if d.is_dir()}
    heldout = [folders[name] for name in HELDOUT_SPLIT_NAMES if name in folders]
    if "train" not in folders or not heldout:
        return None
    unlabelled = [d for d in heldout if not any(c.is_dir() and not c.name.startswith(".") for c in d.iterdir())]
    if unlabelled:
        logger.info("%s: %s has no class sub-folders (no labels), so it is not scored against", root,
                    ", ".join(f"{d.name}/" for d in unlabelled))
        heldout = [d for d in heldout if d not in unlabelled]
        if not heldout:
            return folders["train"], None
    if len(heldout) > 1:
        logger.info("%s has %s: scoring %s/ against %s/", root, [d.name for d in heldout], folders["train"].name,
                    heldout[0].name)
    return folders["train"], heldout[0]


def evaluate_folder(model: IJepa, root: Path, seed: int = 0, device: str = "cpu") -> dict:
    """Class sub-folders: uses train/ and a held-out split beside it when present (val/, valid/, validation/ or
    test/, preferred in that order; it takes train/'s labels), else a fixed random 80/20 split of all images.
    Unreadable files are left out (see ImageFolderDataset), so bank_size and query_size count distinct images."""
    from torch.utils.data import Subset

    from train.data import ImageFolderDataset

    root = Path(root)
    size = model.config.img_size
    splits = _split_folders(root)
    train_root, heldout = splits if splits else (root, None)
    full = ImageFolderDataset(train_root, size, mode="eval")
    if len(full.classes) < 2:
        raise ValueError(f"{full.root}: kNN and linear probes need labelled images, i.e. at least two class "
                         f"sub-folders (found {len(full.classes)}); a flat folder has no labels")
    if heldout is not None:
        bank_set, query_set = full, ImageFolderDataset(heldout, size, mode="eval", classes=full.classes)
        split = f"{train_root.name}/ vs {heldout.name}/"
    else:
        order = np.random.default_rng(seed).permutation(len(full))
        cut = int(0.8 * len(full))
        bank_set, query_set = Subset(full, order[:cut].tolist()), Subset(full, order[cut:].tolist())
        split = f"random 80/20 (seed {seed})"
    random_model = random_init_like(model.config, seed, device)
    num_classes = {"label": len(full.classes)}
    results = {"protocol": f"image folder {root}", "split": split, "bank_size": len(bank_set),
               "query_size": len(query_set), "raw_pixels_side": min(size, FOLDER_PIXEL_SIDE), "features": {}}
    for name, source in (("raw_pixels", None), ("random_init", random_model), ("target_encoder", model)):
        logger.info("%s: %d bank and %d query images", name, len(bank_set), len(query_set))
        bank, bank_labels = pooled_features(source, bank_set, ("label",), device=device, pixel_side=FOLDER_PIXEL_SIDE)
        queries, query_labels = pooled_features(source, query_set, ("label",), device=device,
                                                pixel_side=FOLDER_PIXEL_SIDE)
        results["features"][name] = score(bank, bank_labels, queries, query_labels, num_classes)
    return results


def plot_results(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    features = results["features"]
    metrics = list(next(iter(features.values())))
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=120)
    width = 0.8 / len(features)
    for i, (name, scores) in enumerate(features.items()):
        ax.bar(np.arange(len(metrics)) + i * width, [scores[m] for m in metrics], width, label=name)
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, metrics)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(results.get("protocol", "evaluation"))
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_knn_curve(csv_path: Path, baselines: dict, png_path: Path) -> None:
    """Held-out group kNN against images seen (a ``HeldOutKnn`` log), with the lines it has to clear."""
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    seen = [int(r["images_seen"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for key, label, colour in (("knn_group", "whole image (the protocol)", "C0"),
                               ("object_knn_group", "emoji patches only", "C1")):
        ax.plot(seen, [float(r[key]) for r in rows], "o-", color=colour, label=f"target encoder, {label}")
        ax.axhline(baselines["raw_pixels"][key], color=colour, ls="--", lw=1, label=f"raw pixels, {label}")
    ax.axhline(baselines["random_init"]["knn_group"], color="grey", ls=":", lw=1, label="random init, whole image")
    ax.set(xlabel="images seen", ylabel="held-out group kNN top-1 (%)", title="Semantics during pretraining")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=doc_summary(__doc__))
    parser.add_argument("--checkpoint", required=True, help="our model folder or an official .pth.tar")
    parser.add_argument("--data", default="emoji", help="'emoji' (built-in protocol) or an image folder")
    parser.add_argument("--out-dir", default="runs/eval")
    parser.add_argument("--img-size", type=int, default=None, help="run the model at another resolution")
    parser.add_argument("--box-train", type=int, default=3000, help="boxes to fit the predictor-semantics probe "
                        "(emoji world only: its scenes label each patch, a folder's images do not)")
    parser.add_argument("--box-test", type=int, default=1000, help="boxes per test set (emoji world only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N or mps")
    args = parser.parse_args(argv)
    for flag, count in (("--box-train", args.box_train), ("--box-test", args.box_test)):
        if count < 1:  # checked before the minutes of feature evaluation that come first
            parser.error(f"{flag} must be at least 1, got {count}")
    if args.seed < 0:
        parser.error(f"--seed must be at least 0, got {args.seed}")
    if args.img_size is not None and args.img_size < 1:
        parser.error(f"--img-size must be at least 1, got {args.img_size}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results = evaluate_checkpoint(args.checkpoint, Path(args.out_dir), args.data, args.box_train, args.box_test,
                                  args.seed, args.device, args.img_size)
    print(json.dumps(results, indent=2))
    return results


def evaluate_checkpoint(checkpoint: str | Path, out_dir: Path, data: str = "emoji", box_train: int = 3000,
                        box_test: int = 1000, seed: int = 0, device: str = "auto", img_size: int | None = None) -> dict:
    """The whole evaluation of a model: results.json and results.png in ``out_dir`` (and, on the emoji world, the
    box probes the app reads out). results.json is written last: the recipe takes it as "evaluation finished"."""
    start = time.perf_counter()
    require_data_source(data)  # before the model loads and the out-dir is made
    device = resolve_device(device)
    model = load_model(checkpoint, img_size=img_size).to(device).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    if data == "emoji":
        results = evaluate_emoji_features(model, seed, device)
        if model.predictor is not None:
            from train.emoji import get_catalog

            semantics, probes = evaluate_predictor_semantics(model, box_train, box_test, seed, device)
            results["predictor_semantics"] = semantics
            catalog = get_catalog()
            made_from = {"catalog": catalog.fingerprint, "model_signature": model.feature_signature()}
            save_probe(probes["group"], catalog.group_names, out_dir / "probe_group", **made_from)
            save_probe(probes["subgroup"], catalog.subgroup_names, out_dir / "probe_subgroup", **made_from)
    else:
        results = evaluate_folder(model, Path(data), seed, device)
    results["checkpoint"] = str(checkpoint)
    results["seconds"] = round(time.perf_counter() - start, 1)
    plot_results(results, out_dir / "results.png")
    write_json_atomic(out_dir / "results.json", results)
    return results


if __name__ == "__main__":
    raise SystemExit(run_command(main))
