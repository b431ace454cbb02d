"""Training and evaluation data: the built-in emoji world (train/emoji.py) and any folder of images.

Every dataset returns dicts with an "image" float32 tensor [3, H, W] in [0, 1] (normalisation happens in the
training step) and an "index". Training datasets accept ANY non-negative index, so a sampler can stream
global sample indices and a resumed run sees exactly the images it would have seen.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import transforms

from train.emoji import BACKGROUND_KINDS, EmojiCatalog, EmojiProbeSet, EmojiScenes, get_catalog

__all__ = ["BACKGROUND_KINDS", "EmojiCatalog", "EmojiProbeSet", "EmojiScenes", "IMAGE_EXTENSIONS",
           "ImageFolderDataset", "build_dataset", "get_catalog"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class ImageFolderDataset(Dataset):
    """Images from a folder: class sub-folders (label = index of the sorted folder name) or flat (label -1).

    ``classes`` fixes the label of each class name (e.g. a val/ folder takes its train/ folder's ``classes``, so
    a class missing from one of them does not shift the others' labels).
    mode="train" applies the official I-JEPA transform, RandomResizedCrop(resolution, scale), drawn from a
    generator seeded by (seed, index) so that ``ds[i]`` is reproducible and the global torch RNG is untouched.
    Any i >= 0 is accepted: indices [e * n, (e + 1) * n) read every file once, in an order shuffled by (seed, e),
    so a batch mixes classes (as the official DistributedSampler's shuffle does) while the order stays a pure
    function of the index (exact resume). mode="eval" reads file ``i % n`` with Resize + CenterCrop, no randomness.
    Unreadable files are skipped (the next file is used) with a warning that names them.
    """

    def __init__(self, root: str | os.PathLike, resolution: int, scale: tuple[float, float] = (0.3, 1.0),
                 seed: int = 0, mode: str = "train", classes: list[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist (or is not a directory)")
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.resolution, self.scale, self.seed, self.mode = resolution, scale, seed, mode
        class_files = [(d.name, _images_in(d, recursive=True)) for d in sorted(self.root.iterdir()) if d.is_dir()]
        class_files = [(name, files) for name, files in class_files if files]
        if classes is not None:
            if not class_files:
                raise ValueError(f"{self.root} has no class sub-folders, so its images cannot take labels "
                                 f"{classes[:5]}")
            unknown = sorted(name for name, _ in class_files if name not in classes)
            if unknown:
                raise ValueError(f"{self.root} has classes the label set lacks: {unknown[:5]}")
        if class_files:
            self.classes = list(classes) if classes is not None else [name for name, _ in class_files]
            label_of = {name: label for label, name in enumerate(self.classes)}
            self.samples = [(p, label_of[name]) for name, files in class_files for p in files]
            loose = _images_in(self.root, recursive=False)
            if loose:
                logger.warning("%s has class sub-folders; ignoring %d image(s) directly inside it, e.g. %s",
                               self.root, len(loose), loose[0].name)
        else:
            self.classes = []
            self.samples = [(p, -1) for p in _images_in(self.root, recursive=False)]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {self.root} or its "
                                    "sub-folders")
        if mode == "train":
            self.transform = transforms.Compose([
                transforms.RandomResizedCrop(resolution, scale=scale), transforms.ToTensor()])
        else:
            self.transform = transforms.Compose([
                transforms.Resize(resolution), transforms.CenterCrop(resolution), transforms.ToTensor()])
        self._unreadable: set[int] = set()
        self._epoch_order: tuple[int, np.ndarray] | None = None  # (epoch, its file permutation), cached

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> tuple[Image.Image, int]:
        """The image of file index % n, or of the next readable file."""
        n = len(self.samples)
        for offset in range(n):
            file_index = (index + offset) % n
            if file_index in self._unreadable:
                continue
            path, label = self.samples[file_index]
            try:
                with Image.open(path) as image:
                    return image.convert("RGB"), label
            except OSError as error:  # PIL.UnidentifiedImageError is an OSError too
                self._unreadable.add(file_index)
                logger.warning("skipping unreadable image %s (%s)", path, error)
        raise RuntimeError(f"none of the {n} image files in {self.root} could be read")

    def _file_index(self, index: int) -> int:
        """Which file a global index reads: a per-epoch shuffle in training, the index itself in evaluation."""
        n = len(self.samples)
        if self.mode == "eval":
            return index % n
        epoch, position = divmod(index, n)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            # a seed sequence of another length than the crops' (seed, index), so the two streams never coincide
            self._epoch_order = (epoch, np.random.default_rng([self.seed, epoch, 1]).permutation(n))
        return int(self._epoch_order[1][position])

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            raise IndexError(f"ImageFolderDataset indices are non-negative, got {index}")
        image, label = self._load(self._file_index(index))
        if self.mode == "eval":
            tensor = self.transform(image)
        else:
            # torchvision draws crops from the global CPU generator: seed it for this item, then restore it.
            # (torch.manual_seed would also reseed CUDA generators, which fork_rng(devices=[]) does not restore.)
            with torch.random.fork_rng(devices=[]):
                item_seed = int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])
                torch.default_generator.manual_seed(item_seed)
                tensor = self.transform(image)
        return {"image": tensor, "index": index, "label": label}


class StackFields:
    """DataLoader ``collate_fn``: the named fields of sample dicts stacked into batch tensors (a class, not a lambda,
    so DataLoader workers can pickle it)."""

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([torch.as_tensor(item[k]) for item in items]) for k in self.keys}


class StepBatches(Sampler):
    """Global sample indices for each step from ``start_step``: step s on rank r reads
    s * B * world + r * B + [0, B). Data order is a pure function of the step, so resuming replays nothing."""

    def __init__(self, start_step: int, total_steps: int, batch_size: int, rank: int, world_size: int):
        self.start_step, self.total_steps = start_step, total_steps
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            first = (step * self.world_size + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))


def build_dataset(name_or_path: str | os.PathLike, resolution: int, patch_size: int, seed: int = 0,
                  **kwargs) -> Dataset:
    """"emoji" -> EmojiScenes; an existing directory -> ImageFolderDataset. Extra kwargs go to the dataset."""
    if resolution % patch_size:
        raise ValueError(f"patch_size ({patch_size}) must divide resolution ({resolution})")
    if str(name_or_path) == "emoji":
        return EmojiScenes(resolution=resolution, patch_size=patch_size, seed=seed, **kwargs)
    if Path(name_or_path).is_dir():
        return ImageFolderDataset(name_or_path, resolution, seed=seed, **kwargs)
    raise ValueError(f"unknown dataset {str(name_or_path)!r}: pass 'emoji' or the path of an existing image folder")
