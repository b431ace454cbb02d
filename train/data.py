"""Training and evaluation data: the built-in emoji world (train/emoji.py) and any folder of images.

Every dataset returns dicts with an "image" float32 tensor [3, H, W] in [0, 1] (normalisation happens in the
training step) and an "index". Training datasets accept ANY non-negative index, so a sampler can stream
global sample indices and a resumed run sees exactly the images it would have seen.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import transforms

from ijepa.inference import to_rgb
from train.emoji import BACKGROUND_KINDS, EmojiCatalog, EmojiProbeSet, EmojiScenes, get_catalog, require_seed

__all__ = ["BACKGROUND_KINDS", "EmojiCatalog", "EmojiProbeSet", "EmojiScenes", "HELDOUT_SPLIT_NAMES",
           "IMAGE_EXTENSIONS", "ImageFolderDataset", "build_dataset", "get_catalog"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# Names of the held-out folder beside train/ in a split layout (root/train/<class>/, root/val/<class>/); train.eval
# recognises any of them, in this order of preference.
HELDOUT_SPLIT_NAMES = ("val", "valid", "validation", "test")
SPLIT_NAMES = {"train", "training", "eval", "dev", *HELDOUT_SPLIT_NAMES}  # how a split layout names its folders
# What Pillow raises for a file it cannot read: OSError covers missing, unidentified, truncated and damaged files;
# the parsers also raise SyntaxError, ValueError and EOFError, and an oversized image DecompressionBombError.
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _hidden(path: Path, folder: Path) -> bool:
    """Whether any part of path below folder starts with "." (macOS ._* AppleDouble twins, .ipynb_checkpoints/)."""
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(p, folder) and p.is_file())


def _read_rgb(path: Path) -> Image.Image:
    """The file decoded as the app decodes uploads (ijepa.inference.to_rgb): EXIF rotation applied, 16-bit and float
    images scaled to 8 bits, transparency composited onto white. Raises one of _READ_ERRORS."""
    with Image.open(path) as image:
        image.load()
        rgb = to_rgb(image)
        return image.copy() if rgb is image else rgb  # closing the file would destroy an image it returned as is


def _unreadable_reason(path: Path) -> str | None:
    """Why Pillow cannot read the file, from its header and (for PNG, GIF, ...) its checksums, without decoding
    the pixels; None when it looks readable. verify() reads only a JPEG's header, so a JPEG that does not end
    with its end-of-image marker (cut short, or with data after the marker) is decoded to tell."""
    try:
        with Image.open(path) as image:
            is_jpeg = image.format == "JPEG"
            image.verify()
        if is_jpeg and not _ends_with_jpeg_marker(path):
            with Image.open(path) as image:
                image.load()
    except _READ_ERRORS as error:
        return f"{type(error).__name__}: {error}"
    return None


def _ends_with_jpeg_marker(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-2, os.SEEK_END)
        return file.read(2) == b"\xff\xd9"


def _split_layout_error(root: Path, class_files: list[tuple[str, list[Path]]]) -> str | None:
    """A message when root's sub-folders look like splits rather than classes: one of them is named like a split,
    none of them holds an image directly, and they share the names of the sub-folders that do (train/cat/,
    test/cat/, ...). Class folders with a common inner folder (cat/images/, dog/images/) are classes."""
    if len(class_files) < 2 or not any(name.lower() in SPLIT_NAMES for name, _ in class_files):
        return None
    inner: dict[str, set[str]] = {}
    for name, files in class_files:
        relative = [p.relative_to(root / name).parts for p in files]
        if any(len(parts) == 1 for parts in relative):
            return None  # this folder holds images itself: a class folder
        inner[name] = {parts[0] for parts in relative}
    shared = sorted({sub for subs in inner.values() for sub in subs
                     if sum(sub in subs_ for subs_ in inner.values()) >= 2})
    if not shared:
        return None  # e.g. cat/<photo session>/, dog/<another session>/: nested class folders
    return (f"{root} looks like a split layout, not class folders: its sub-folders {sorted(inner)[:5]} hold no "
            f"images themselves, only sub-folders with the same names ({shared[:5]}), so the split names would "
            f"become the labels. Point at one split (e.g. {root / sorted(inner)[0]}); train.eval scores "
            f"root/train/<class>/ against root/<{'|'.join(HELDOUT_SPLIT_NAMES)}>/<class>/")


class ImageFolderDataset(Dataset):
    """Images from a folder: class sub-folders (label = index of the sorted folder name) or flat (label -1).

    ``classes`` fixes the label of each class name (e.g. a val/ folder takes its train/ folder's ``classes``, so
    a class missing from one of them does not shift the others' labels).
    mode="train" applies the official I-JEPA transform, RandomResizedCrop(resolution, scale), drawn from a
    generator seeded by (seed, index) so that ``ds[i]`` is reproducible and the global torch RNG is untouched.
    Any i >= 0 is accepted: indices [e * n, (e + 1) * n) read every file once, in an order shuffled by (seed, e),
    so a batch mixes classes (as the official DistributedSampler's shuffle does) while the order stays a pure
    function of the index (exact resume). mode="eval" reads file ``i % n`` with Resize + CenterCrop, no randomness.
    Files are decoded as the app decodes uploads (``ijepa.inference.to_rgb``). Names starting with "." are ignored
    (macOS ._* twins, .ipynb_checkpoints/). mode="eval" checks every file's header when it is built and drops the
    unreadable ones (one warning), so each item is a distinct file; a file that still fails to decode raises.
    mode="train" checks only that one file can be read (all of a large folder would take long): a file that fails
    to read is replaced by the next readable one, with a warning once per file (per DataLoader worker).
    A folder whose sub-folders hold no images of their own, only sub-folders named alike (train/cat/, test/cat/),
    is refused: it is a split layout, whose split names would become the labels.
    """

    def __init__(self, root: str | os.PathLike, resolution: int, scale: tuple[float, float] = (0.3, 1.0),
                 seed: int = 0, mode: str = "train", classes: list[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist (or is not a directory)")
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        require_seed(seed)
        self.resolution, self.scale, self.seed, self.mode = resolution, scale, seed, mode
        class_files = [(d.name, _images_in(d, recursive=True)) for d in sorted(self.root.iterdir())
                       if d.is_dir() and not d.name.startswith(".")]
        class_files = [(name, files) for name, files in class_files if files]
        split_error = _split_layout_error(self.root, class_files)
        if split_error:
            raise ValueError(split_error)
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
            if len(loose) > len(self.samples):  # a stray sub-folder (thumbs/), most likely: not what was meant
                raise ValueError(f"{self.root} holds {len(loose)} images directly and {len(self.samples)} in "
                                 f"sub-folders ({', '.join(name for name, _ in class_files[:3])}), which are read "
                                 "as classes, the loose images left out: move the sub-folders out, or point at the "
                                 "folder of class sub-folders you mean")
            if loose:
                logger.warning("%s has class sub-folders; ignoring %d image(s) directly inside it, e.g. %s",
                               self.root, len(loose), loose[0].name)
        else:
            self.classes = []
            self.samples = [(p, -1) for p in _images_in(self.root, recursive=False)]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {self.root} or its "
                                    "sub-folders")
        if mode == "eval":
            self.samples = self._readable_samples()
        else:
            self._check_one_readable()
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

    @property
    def fingerprint(self) -> str:
        """The folder's file list and labels (not the pixels, which would take minutes to hash on a large folder):
        the data order follows it, so a resumed run compares it with its checkpoint's (``check_resumed_data``)."""
        listing = "\n".join(f"{path.relative_to(self.root).as_posix()}\t{label}" for path, label in self.samples)
        return f"{len(self.samples)} images, sha1 {hashlib.sha1(listing.encode()).hexdigest()[:12]}"

    def _readable_samples(self) -> list[tuple[Path, int]]:
        """The samples whose files Pillow can read (header and checksums; see _unreadable_reason)."""
        reasons = [_unreadable_reason(path) for path, _ in self.samples]
        bad = [(path, reason) for (path, _), reason in zip(self.samples, reasons) if reason is not None]
        if len(bad) == len(self.samples):
            raise FileNotFoundError(f"none of the {len(bad)} image files in {self.root} can be read, e.g. "
                                    f"{bad[0][0]} ({bad[0][1]})")
        if bad:
            logger.warning("%s: leaving out %d of %d image files that cannot be read, e.g. %s (%s)", self.root,
                           len(bad), len(self.samples), bad[0][0], bad[0][1])
        return [sample for sample, reason in zip(self.samples, reasons) if reason is None]

    def _check_one_readable(self) -> None:
        """In training, files are checked as they are read; but a folder none of whose files can be read must be
        refused here, before the run writes anything, not as a traceback from a DataLoader worker. Stops at the
        first readable file, so a large folder costs one header check."""
        first_bad = None
        for path, _ in self.samples:
            reason = _unreadable_reason(path)
            if reason is None:
                return
            first_bad = first_bad or (path, reason)
        raise FileNotFoundError(f"none of the {len(self.samples)} image files in {self.root} can be read, e.g. "
                                f"{first_bad[0]} ({first_bad[1]})")

    def _load(self, index: int) -> tuple[Image.Image, int]:
        """The image of file index % n; in training, of the next readable file when that one cannot be read."""
        n = len(self.samples)
        if self.mode == "eval":
            path, label = self.samples[index % n]
            try:
                return _read_rgb(path), label
            except _READ_ERRORS as error:  # passed the header check, but the pixels do not decode
                raise RuntimeError(f"cannot decode {path} ({type(error).__name__}: {error}); evaluation does not "
                                   "substitute another file: remove or repair it") from error
        for offset in range(n):
            file_index = (index + offset) % n
            if file_index in self._unreadable:
                continue
            path, label = self.samples[file_index]
            try:
                return _read_rgb(path), label
            except _READ_ERRORS as error:
                self._unreadable.add(file_index)
                logger.warning("skipping unreadable image %s (%s: %s); the next readable file is used instead",
                               path, type(error).__name__, error)
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
    require_data_source(name_or_path)
    if str(name_or_path) == "emoji":
        return EmojiScenes(resolution=resolution, patch_size=patch_size, seed=seed, **kwargs)
    return ImageFolderDataset(name_or_path, resolution, seed=seed, **kwargs)


def require_data_source(name_or_path: str | os.PathLike) -> None:
    """ValueError unless ``name_or_path`` is "emoji" or an existing folder: callers check it before minutes of work."""
    if str(name_or_path) != "emoji" and not Path(name_or_path).is_dir():
        raise ValueError(f"unknown dataset {str(name_or_path)!r}: pass 'emoji' or the path of an existing image "
                         "folder")


def check_resumed_data(saved: str | None, dataset: Dataset, checkpoint: Path | None) -> None:
    """A resumed run's data against its checkpoint's ``fingerprint``. An image folder whose files changed goes on (a
    large folder may lose or gain a file), saying that from here the run differs from an uninterrupted one: the data
    order follows the list. A changed emoji catalog (the font or emoji-test.txt updated) stops it: its held-out split
    changed too, so the run would train on emoji that its evaluation holds out."""
    current = getattr(dataset, "fingerprint", None)
    if not saved or not current or saved == current:
        return
    if isinstance(dataset, EmojiScenes):
        raise ValueError(
            f"cannot resume from {checkpoint}: the emoji catalog changed since ({saved} then, {current} now: the font "
            "or emoji-test.txt was updated), and its held-out split with it, so the run would train on emoji its "
            "evaluation holds out. Point IJEPA_EMOJI_FONT and IJEPA_EMOJI_TEST at the files the run started with, "
            "or start a new run in another --out-dir (nothing was overwritten).")
    logger.warning("the image folder changed since %s (%s then, %s now): the run goes on, but from here its data "
                   "order differs from an uninterrupted run's", checkpoint, saved, current)
