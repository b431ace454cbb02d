"""The app's engine: load a bundle (I-JEPA model, sketch decoder, probes, reference bank, examples) and answer
"what does the model expect inside this box?" with plain dataclasses and numpy images.

The same API serves the Gradio app, scripts and notebooks::

    from ijepa.engine import Engine

    engine = Engine.load("assets")                       # or Engine.load(checkpoint="IN1K-vit.h.14-300e.pth.tar")
    image = engine.open_image("photo.jpg")               # any common format; EXIF rotation applied
    result = engine.analyze(image, [[120, 80, 260, 200]])  # boxes (xmin, ymin, xmax, ymax) in the photo's pixels
    print(result.metrics()["boxes"][0]["prediction_error"])
    for update in engine.stream_sketches(result, num_samples=4, seed=0):
        print(len(update.images), "sketches ready")      # [S, S, 3] uint8 images at the model's resolution
    surprise = engine.surprise_map(image)                # .errors [gh, gw] float array, .figure RGB array

Every bundle part except the model is optional; ``engine.notes`` says what is missing and how to add it. The
bundle's layout and loaders are in ``ijepa/bundle.py``. What the app's panels show of these results (images and
Markdown) is made in ``ijepa/panels.py``, except three figures the engine returns ready-made because drawing them
needs the model (decoding the truth, the features' PCA) or is cached with it: ``truth_vs_prediction``,
``surprise_map(...).figure`` and ``feature_view``. Every figure is drawn by ``ijepa/figures.py``, and
``ijepa/app_functions.py`` binds the engine and the panels into the functions the app is given.
The engine holds no per-request state: models are read-only after loading, so one engine serves many users.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from decoder import SketchCondition, SketchDecoder, SketchSampler, box_mask_from_indices
from decoder.pipeline import DEFAULT_NUM_STEPS

from .boxes import MAX_BOXES, Box, boxes_to_masks, map_boxes, parse_box
from .bundle import (DECODER_DIRS, DEFAULT_ASSETS, EXAMPLES_DIR, MODEL_CARD_NAME, MODEL_DIR, Example, FeatureBank,
                     load_decoder, load_examples, load_readouts, train_decoder_hint)
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_model, recipe_bundle_hint
from .device import resolve_device, resolve_precision
from .errors import InputError
from .figures import HIDDEN_GREY, render_feature_view, render_surprise, render_truth_vs_prediction
from .inference import (BoxAnalysis, BoxPrediction, LinearReadout, PreparedImage, analyze_boxes, default_window,
                        feature_pca, nearest_neighbours, open_image, prepare_image, surprise_map, to_rgb, true_features)
from .model import IJepa

logger = logging.getLogger(__name__)

# What the app calls each kind of sketch decoder (bundle.DECODER_DIRS: where each lives).
DECODER_NAMES = {"spatial_context": "Detailed (ours)", "pooled": "Pooled (as in the I-JEPA paper)"}
DEFAULT_NUM_SAMPLES = 4
MAX_NUM_SAMPLES = 8
MAX_NUM_STEPS = 50
NUM_NEIGHBOURS = 6
SURPRISE_CACHE_SIZE = 8  # surprise maps kept (image x window), each with its figure: at most a few MB in all


@dataclass(frozen=True)
class ModelInfo:
    """What is loaded, for people: shown at the top of the app."""

    source: str
    arch: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    predictor: str
    trained_on: str
    decoder_sources: dict[str, str] = field(default_factory=dict)  # conditioning -> folder, the default first

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def default_window(self) -> int:
        """The surprise map's window side when none is given."""
        return default_window((self.grid, self.grid))


@dataclass(frozen=True)
class Neighbour:
    index: int
    label: str
    similarity: float


@dataclass(frozen=True)
class BoxReport:
    """Everything the app shows about one box, in JSON-able form (plus bank indices for thumbnails)."""

    number: int
    box: tuple[float, float, float, float]  # as given, user-image pixels
    box_model: tuple[float, float, float, float]  # model pixels, clipped to the model's square
    clipped: bool  # part of the box lay outside the image or the centre square the model sees, and was cut off
    patches: int
    error: float
    baseline_error: float  # guessing the visible patches' average feature: the bar the prediction has to clear
    error_per_patch: tuple[float, ...]
    probe: dict[str, list[tuple[str, float]]]
    probe_on_truth: dict[str, list[tuple[str, float]]]
    neighbours: tuple[Neighbour, ...]


@dataclass
class Analysis:
    """One image with its boxes hidden and predicted (``Engine.analyze``)."""

    prepared: PreparedImage
    result: BoxAnalysis
    reports: list[BoxReport]
    patch_size: int

    @property
    def num_patches(self) -> int:
        gh, gw = self.result.grid_size
        return gh * gw

    def box_masks(self) -> list[np.ndarray]:
        """Per box, a bool [S, S] pixel mask of the patches the model hid."""
        size = (self.prepared.size, self.prepared.size)
        return [box_mask_from_indices(box.target_indices.view(1, -1), self.result.grid_size, size)[0, 0].bool().numpy()
                for box in self.result.boxes]

    def hidden_view(self, masks: list[np.ndarray] | None = None) -> np.ndarray:
        """The model's input, uint8, with every box grey: what the model was shown (``masks``: ``box_masks()``)."""
        view = self.prepared.to_uint8().copy()
        view[np.logical_or.reduce(self.box_masks() if masks is None else masks)] = HIDDEN_GREY
        return view

    def metrics(self) -> dict[str, Any]:
        """A JSON-able summary: per-box prediction error, probe top-5 and neighbours."""
        return {
            "image_size": list(self.prepared.source_size),
            "model_view": {"size": self.prepared.size, "crop_left_top_side": [round(v, 2) for v in self.prepared.crop]},
            "context_patches": int(self.result.context_indices.numel()),
            "total_patches": self.num_patches,
            "boxes": [
                {
                    "box": [round(v, 2) for v in r.box],
                    "box_model_px": [round(v, 2) for v in r.box_model],
                    "clipped": r.clipped,
                    "hidden_patches": r.patches,
                    "prediction_error": round(r.error, 4),
                    "visible_average_error": round(r.baseline_error, 4),
                    "error_per_patch": [round(v, 4) for v in r.error_per_patch],
                    "probe": {k: [{"label": lab, "probability": round(p, 4)} for lab, p in v]
                              for k, v in r.probe.items()},
                    "probe_on_truth": {k: [{"label": lab, "probability": round(p, 4)} for lab, p in v]
                                       for k, v in r.probe_on_truth.items()},
                    "neighbours": [{"label": n.label, "cosine": round(n.similarity, 4), "bank_index": n.index}
                                   for n in r.neighbours],
                }
                for r in self.reports
            ],
        }


@dataclass
class SketchUpdate:
    """One event of ``Engine.stream_sketches``: the sketches finished so far.

    ``images[j]`` is the model's view with every box filled by its sample ``sample_indices[j]``; pixels
    outside the boxes are exactly the model's input. Where boxes overlap it shows the later box, so each box's own
    panels draw from ``box_images[j][b]``: the model's view with box ``b`` filled by its sketch, the other boxes grey.
    """

    images: list[np.ndarray]
    box_images: list[np.ndarray]  # per sketch, [boxes, S, S, 3] uint8
    sample_indices: tuple[int, ...]
    num_samples: int
    seed: int
    done: bool
    seconds: float
    conditioning: str = "spatial_context"  # which decoder drew them (a key of DECODER_NAMES)
    num_steps: int = DEFAULT_NUM_STEPS  # the solver steps that drew them


@dataclass(frozen=True)
class SurpriseMap:
    errors: np.ndarray  # [gh, gw] mean per-patch prediction error over the windows covering each patch
    window: tuple[int, int]
    stride: int
    figure: np.ndarray  # RGB rendering with a colour bar


@dataclass
class Engine:
    """Bundle-backed inference for the app. Build with ``Engine.load``; all methods are safe to call concurrently."""

    model: IJepa
    info: ModelInfo
    decoders: dict[str, SketchDecoder] = field(default_factory=dict)  # by conditioning; the first is the default
    probes: dict[str, LinearReadout] = field(default_factory=dict)
    bank: FeatureBank | None = None
    examples: list[Example] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bf16: bool = False
    samplers: dict[str, SketchSampler] = field(init=False, default_factory=dict)
    # The app redraws the surprise map after every run, but it depends only on the image and the window: a
    # ViT-H on a CPU would otherwise repeat ~50 windowed forward passes for each new box on the same image.
    _surprise_cache: OrderedDict[tuple, SurpriseMap] = field(init=False, default_factory=OrderedDict)
    _surprise_lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.model.eval().requires_grad_(False)
        for conditioning, decoder in self.decoders.items():
            decoder.eval().requires_grad_(False)
            self.samplers[conditioning] = SketchSampler(decoder)

    # ----- loading ---------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, assets: str | Path | None = DEFAULT_ASSETS, checkpoint: str | Path | None = None,
             decoder: str | Path | Sequence[str | Path] | None = None, device: str = "auto",
             precision: str = "auto") -> "Engine":
        """Load the bundle in ``assets`` (layout: ``ijepa/bundle.py``), or another model.

        Args:
            assets: bundle folder. Its model, decoder, probes and bank are used unless ``checkpoint`` is given;
                its examples are always used when present. A checkpoint file or model folder here is taken
                as ``checkpoint``.
            checkpoint: an official ``.pth.tar`` or one of our model folders. Probes and bank are then not
                used (they describe the bundle model's features); pass ``decoder`` trained for this model.
            decoder: ``SketchDecoder.save_pretrained`` folder(s) for this model, at most one per conditioning; the
                first is the default. For the bundle model: ``assets/decoder`` and ``assets/decoder_paper``.
            device: "cpu", "cuda", "cuda:N", "mps", or "auto" (CUDA when available, else the CPU).
            precision: the sketch decoders' autocast: "auto" (bf16 where it is native: CUDA, CPUs with AVX512-BF16
                or AMX; the same sketch metrics as fp32 to three decimals and ~1.5x faster on the project's CPU,
                bench/RESULTS.md), "bf16" or "fp32" (emulated bf16 is many times slower).
        """
        device = resolve_device(device)
        bf16 = resolve_precision(torch.device(device), precision) == "bf16"
        assets = Path(assets) if assets is not None else None
        if checkpoint is None and assets is not None and (assets.is_file() or (assets / CONFIG_NAME).is_file()):
            checkpoint, assets = assets, None  # Engine.load("model.pth.tar") or Engine.load("runs/x/model")
        notes: list[str] = []
        if checkpoint is None:
            if assets is None:
                raise ValueError("give a bundle folder (assets) or a checkpoint")
            checkpoint = assets / MODEL_DIR
            if not (checkpoint / CONFIG_NAME).is_file():
                raise FileNotFoundError(
                    f"no model in {checkpoint} (expected {CONFIG_NAME} and {WEIGHTS_NAME})"
                    f"{recipe_bundle_hint(assets)}. Pass --checkpoint PATH (an official I-JEPA .pth.tar or a model "
                    "folder from python -m train.pretrain), or --assets DIR pointing at a bundle that has model/.")
            bundle_model = True
        else:  # the bundle's own model named explicitly keeps the bundle's probes and bank
            bundle_model = assets is not None and Path(checkpoint).resolve() == (assets / MODEL_DIR).resolve()
        checkpoint = Path(checkpoint)
        model = load_model(checkpoint).to(device)
        if model.predictor is None:
            raise ValueError(f"{checkpoint} gives no predictor (no predictor weights, or no context encoder for "
                             "them to read); the app needs a full I-JEPA checkpoint (encoder, target_encoder and "
                             "predictor)")
        paths = [decoder] if isinstance(decoder, (str, Path)) else list(decoder or [])
        # Decoders named on the command line must load; a bundle's own that cannot turns its sketches off instead.
        optional = not paths and bundle_model and assets is not None
        if optional:
            paths = [assets / name for name in DECODER_DIRS.values() if (assets / name).is_dir()]
        decoders: dict[str, SketchDecoder] = {}
        sources: dict[str, str] = {}
        for path in paths:
            try:
                sketch_decoder = load_decoder(path, model, checkpoint).to(device)
            except (FileNotFoundError, ValueError) as err:
                if not optional:
                    raise
                notes.append(f"The sketch decoder in {path} could not be loaded, so its sketches are off: {err}")
                continue
            conditioning = sketch_decoder.config.conditioning
            if conditioning in decoders and optional:  # a bundle's folders, e.g. one copied over the other
                notes.append(f"{path} holds a second {conditioning!r} decoder (the one in {sources[conditioning]} is "
                             "used), so the other kind's sketches are off.")
                continue
            if conditioning in decoders:
                raise ValueError(f"{sources[conditioning]} and {path} are both {conditioning!r} decoders; pass at most "
                                 f"one of each kind ({', '.join(DECODER_NAMES)})")
            decoders[conditioning], sources[conditioning] = sketch_decoder, str(path)
        if not decoders:
            notes.append(
                "No sketch decoder for this model, so the Sketches and the decoded Truth-vs-prediction images are "
                "off (everything else works). Train one with `"
                + train_decoder_hint(checkpoint, model.config) + "` and pass its folder with --decoder.")
        if bundle_model and assets is not None:
            probes, bank = load_readouts(assets, model.config.embed_dim, notes, model)
        else:
            probes, bank = {}, None
            notes.append("Probe readout and nearest neighbours belong to the bundled model, so they are off for "
                         "--checkpoint models.")
        examples = load_examples(assets / EXAMPLES_DIR, notes) if assets is not None else []
        config = model.config
        info = ModelInfo(
            source=str(checkpoint), arch=config.arch or f"ViT {config.embed_dim}-d x {config.depth}",
            img_size=config.img_size, patch_size=config.patch_size, embed_dim=config.embed_dim, depth=config.depth,
            predictor=f"{config.predictor_depth} blocks x {config.predictor_embed_dim}-d",
            trained_on=config.trained_on or "not recorded in the checkpoint",
            decoder_sources=sources,
        )
        logger.info("loaded %s (%s, %d px) on %s; decoders: %s (%s)", checkpoint, info.arch, info.img_size, device,
                    sources or "none", "bf16 autocast" if bf16 else "fp32")
        return cls(model=model, info=info, decoders=decoders, probes=probes, bank=bank, examples=examples,
                   notes=notes, bf16=bf16)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_decoder(self) -> bool:
        return bool(self.samplers)

    @property
    def conditionings(self) -> tuple[str, ...]:
        """Keys of DECODER_NAMES with a loaded decoder, the default first."""
        return tuple(self.samplers)

    @property
    def size(self) -> int:
        return self.model.config.img_size

    @property
    def patch_size(self) -> int:
        return self.model.config.patch_size

    def describe(self) -> str:
        """Markdown: which model is loaded, its resolution, what it was trained on, and what is missing."""
        i = self.info
        lines = [
            f"**Model:** {i.arch} ({i.depth} blocks, {i.embed_dim}-d features), sees {i.img_size}x{i.img_size} px "
            f"in {i.grid}x{i.grid} patches of {i.patch_size}x{i.patch_size} px; predictor {i.predictor}. "
            f"**Trained on:** {i.trained_on}. Loaded from `{shown_path(i.source)}`.",
        ]
        for conditioning, source in i.decoder_sources.items():
            lines.append(f"**Sketch decoder, {DECODER_NAMES[conditioning]}:** `{shown_path(source)}` ({conditioning} "
                         "conditioning).")
        extras = [f"probe ({name}, {len(p.labels)} labels)" for name, p in self.probes.items()]
        if self.bank is not None:
            extras.append(f"reference bank ({len(self.bank.features)} boxes)")
        if extras:
            lines.append("**Readout:** " + ", ".join(extras) + ".")
        card = self.model_card_path()
        if card:
            lines.append(f"**Model card** (below; `{shown_path(str(card))}`): how it was trained, its measured "
                         "figures, limits.")
        lines.extend(f"*{note}*" for note in self.notes)
        return "\n\n".join(lines)

    def model_card_path(self) -> Path | None:
        """The model card a bundle keeps beside its model folder, None where there is none. Never for a checkpoint
        file: a card beside an official .pth.tar (one dropped into assets/) tells another model's story."""
        source = Path(self.info.source)
        card = source.parent / MODEL_CARD_NAME
        return card if source.is_dir() and card.is_file() else None

    def model_card(self) -> str:
        """The bundle's model card (Markdown), "" for a model without one: the app shows it, since a visitor of a
        served app cannot open a file on the server."""
        card = self.model_card_path()
        return card.read_text(encoding="utf-8", errors="replace") if card else ""

    def warm_up(self) -> None:
        """Run every path once on a blank image so the first user does not pay for kernel selection."""
        blank = np.full((self.size, self.size, 3), 128, dtype=np.uint8)
        # about the middle sixteenth, and at least one patch: a box inside one patch is refused (a 3 x 3 grid's was)
        grid = self.size // self.patch_size
        start, side = (grid // 4) * self.patch_size, max(1, grid // 4) * self.patch_size
        analysis = self.analyze(blank, [[start, start, start + side, start + side]])
        for conditioning in self.conditionings:
            for _ in self.stream_sketches(analysis, num_samples=1, num_steps=2, conditioning=conditioning):
                pass

    # ----- the computations behind the panels ------------------------------------------------------------------

    @staticmethod
    def open_image(source: str | Path | bytes | BinaryIO) -> Image.Image:
        """Decode an image file (size-checked before decoding) into upright 8-bit RGB; ValueError if unusable."""
        return to_rgb(open_image(source))

    def prepare(self, image: Image.Image | np.ndarray | str | Path) -> PreparedImage:
        """The model's square view of any image (file path, PIL image or array)."""
        if isinstance(image, (str, Path, bytes)):
            image = open_image(image)
        return prepare_image(image, self.size)

    def analyze(self, image: Image.Image | np.ndarray | str | Path, boxes: Sequence[Box]) -> Analysis:
        """Hide the boxes (user-image pixels), predict them from the rest, compare with the truth, read out.

        Raises InputError (with a message for the user) for unusable images or boxes.
        """
        prepared = self.prepare(image)
        model_boxes = map_boxes(prepared, boxes, self.patch_size, MAX_BOXES)
        context, targets = boxes_to_masks(model_boxes, (self.size, self.size), self.model.config.grid_size)
        result = analyze_boxes(self.model, prepared.pixels, context, targets)
        reports = [self._report(n, box, model_box, prediction, prepared)
                   for n, (box, model_box, prediction) in enumerate(zip(boxes, model_boxes, result.boxes), start=1)]
        return Analysis(prepared, result, reports, self.patch_size)

    def _report(self, number: int, box: Box, model_box: tuple[float, ...], prediction: BoxPrediction,
                prepared: PreparedImage) -> BoxReport:
        predicted, true = prediction.pooled_predicted, prediction.pooled_true
        probe = {name: p.top_k(predicted, 5) for name, p in self.probes.items()}
        probe_on_truth = {name: p.top_k(true, 1) for name, p in self.probes.items()}
        neighbours: tuple[Neighbour, ...] = ()
        if self.bank is not None:
            indices, sims = nearest_neighbours(self.bank.features, predicted, NUM_NEIGHBOURS,
                                               centre=self.bank.centre)
            neighbours = tuple(Neighbour(int(i), self.bank.label_of(int(i)), float(s))
                               for i, s in zip(indices.tolist(), sims.tolist()))
        given = parse_box(box, number)
        clipped = any(abs(a - b) > 1e-6 for a, b in zip(model_box, prepared.to_model(given)))
        return BoxReport(number=number, box=given, box_model=tuple(model_box), clipped=clipped,
                         patches=int(prediction.target_indices.numel()), error=prediction.error,
                         baseline_error=prediction.baseline_error,
                         error_per_patch=tuple(prediction.errors.tolist()), probe=probe,
                         probe_on_truth=probe_on_truth, neighbours=neighbours)

    def _conditions(self, analysis: Analysis, tokens_of: Callable[[BoxPrediction], torch.Tensor]) -> SketchCondition:
        """One decoder condition per box. The context blanks EVERY box: the predictor saw none of them."""
        size, grid = self.size, self.model.config.grid_size
        image = analysis.prepared.pixels.unsqueeze(0) * 2 - 1
        hidden = torch.cat([b.target_indices for b in analysis.result.boxes]).unsqueeze(0)
        context = image.masked_fill(box_mask_from_indices(hidden, grid, (size, size)).bool(), 0.0)
        conditions = []
        for box in analysis.result.boxes:
            indices = box.target_indices.unsqueeze(0)
            mask = box_mask_from_indices(indices, grid, (size, size))
            conditions.append(SketchCondition(tokens_of(box).unsqueeze(0).float(), indices, context, mask))
        return SketchCondition.cat(conditions)

    def _autocast(self):
        if not self.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _require_decoder(self, conditioning: str | None) -> tuple[str, SketchSampler]:
        """The sampler of ``conditioning`` (None: the default decoder), or an InputError that says what is loaded."""
        if not self.samplers:
            raise InputError("No sketch decoder is loaded for this model. Train one with `"
                             + train_decoder_hint(self.info.source, self.model.config) + "` and pass --decoder.")
        conditioning = conditioning or self.conditionings[0]
        if conditioning not in self.samplers:
            loaded = ", ".join(f"{s!r} ({DECODER_NAMES[s]})" for s in self.samplers)
            raise InputError(f"No {conditioning!r} sketch decoder is loaded; choose one of: {loaded}.")
        return conditioning, self.samplers[conditioning]

    def conditioning_of(self, requested: str | None) -> str | None:
        """The decoder kind that draws sketches for ``requested`` (None: the default); None without a decoder."""
        return self._require_decoder(requested)[0] if self.has_decoder else None

    def note_on(self, topic: str, default: str) -> str:
        """The loading note that mentions ``topic`` (what is missing and how to add it), else ``default``."""
        return next((note for note in self.notes if topic in note.lower()), default)

    @staticmethod
    def check_sampling(num_samples: int, num_steps: int, seed: int) -> None:
        """InputError for a number of sketches, of steps or a seed the sampler cannot take."""
        if not 1 <= int(num_samples) <= MAX_NUM_SAMPLES:
            raise InputError(f"The number of sketches must be between 1 and {MAX_NUM_SAMPLES}, got {num_samples}.")
        if not 1 <= int(num_steps) <= MAX_NUM_STEPS:
            raise InputError(f"The number of sampler steps must be between 1 and {MAX_NUM_STEPS}, got {num_steps}.")
        if not 0 <= int(seed) < 2**31:
            raise InputError(f"The seed must be a whole number from 0 to {2**31 - 1}, got {seed}.")

    @staticmethod
    def _sketch_images(analysis: Analysis, sketches: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
        """Sampler output [boxes, samples, 3, S, S] in [0, 1] -> per sample, (composite, fills). ``fills``
        [boxes, S, S, 3] uint8: the model's input with box b filled by its sketch and the other boxes grey (hidden
        from the model, and not what this box's sketch drew); ``composite``: every box filled (where boxes overlap,
        the later box's sketch). Pixels outside every box are copied from the input, so they are exact."""
        masks = analysis.box_masks()
        base, hidden, inside = analysis.prepared.to_uint8(), analysis.hidden_view(masks), np.stack(masks)[..., None]
        pixels = np.round(sketches.permute(1, 0, 3, 4, 2).float().cpu().numpy() * 255).astype(np.uint8)
        images = []
        for sample in pixels:
            fills = np.where(inside, sample, hidden)
            composite = base.copy()
            for fill, mask in zip(fills, masks):
                composite[mask] = fill[mask]
            images.append((composite, fills))
        return images

    def stream_sketches(self, analysis: Analysis, num_samples: int = DEFAULT_NUM_SAMPLES, seed: int = 0,
                        num_steps: int = DEFAULT_NUM_STEPS, conditioning: str | None = None,
                        should_stop: Callable[[], bool] | None = None) -> Iterator[SketchUpdate]:
        """Sketches of what the predictor expects in every box, yielded as they finish: first sample 0 of every
        box, then all of them (``done``). Each update holds every sketch finished so far. Sample i depends only
        on (seed, i), so a seed reproduces its sketches. ``conditioning``: which decoder (None: the default).
        ``should_stop``: asked before every sampler step; True raises ``ijepa.errors.WorkStopped``."""
        conditioning, sampler = self._require_decoder(conditioning)
        self.check_sampling(num_samples, num_steps, seed)
        cond = self._conditions(analysis, lambda box: box.predicted)
        boxes = cond.batch_size
        start = time.perf_counter()
        finished: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # sample index -> (composite, per-box fills)
        events = sampler.stream(cond, num_samples=int(num_samples), num_steps=int(num_steps), seed=int(seed), first=1,
                                should_stop=should_stop)
        while True:
            with self._autocast():  # entered per step, so autocast never leaks into the caller between yields
                event = next(events, None)
            if event is None:
                return
            images = event.images.view(boxes, len(event.sample_indices), *event.images.shape[1:])
            finished.update(zip(event.sample_indices, self._sketch_images(analysis, images)))
            order = tuple(sorted(finished))
            yield SketchUpdate([finished[i][0] for i in order], [finished[i][1] for i in order], order,
                               int(num_samples), int(seed), event.done, time.perf_counter() - start, conditioning,
                               int(num_steps))

    def sketch_metrics(self, update: SketchUpdate) -> dict[str, Any]:
        """What drew ``update``, for a run's metrics: ``decoder`` is its kind, as a request names it."""
        return {"decoder": update.conditioning, "decoder_path": self.info.decoder_sources[update.conditioning],
                "seed": update.seed, "num_samples": update.num_samples, "num_steps": update.num_steps,
                "sketch_seconds": round(update.seconds, 3)}

    def sketches(self, analysis: Analysis, num_samples: int = DEFAULT_NUM_SAMPLES, seed: int = 0,
                 num_steps: int = DEFAULT_NUM_STEPS, conditioning: str | None = None,
                 should_stop: Callable[[], bool] | None = None) -> SketchUpdate:
        """All sketches at once: the last update of ``stream_sketches``, so that the API and the UI give the same
        pixels (in bf16 a sketch can differ by a level in a few pixels when drawn in a batch of another size)."""
        *_, last = self.stream_sketches(analysis, num_samples, seed, num_steps, conditioning, should_stop)
        return last

    def decode_truth(self, analysis: Analysis, seed: int = 0, num_steps: int = DEFAULT_NUM_STEPS,
                     conditioning: str | None = None, should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        """The decoder's rendering of the TARGET encoder's true features, per box: [boxes, S, S, 3] uint8, the
        model's input with box b filled and the other boxes grey (sample 0 of ``seed``: the same noise as the first
        predicted sketch, so the two differ only by their features)."""
        _, sampler = self._require_decoder(conditioning)
        self.check_sampling(1, num_steps, seed)
        cond = self._conditions(analysis, lambda box: box.true)
        with self._autocast():
            images = sampler.sample(cond, num_samples=1, num_steps=int(num_steps), seed=int(seed),
                                    should_stop=should_stop)
        (_, fills), = self._sketch_images(analysis, images.view(cond.batch_size, 1, *images.shape[1:]))
        return fills

    def truth_vs_prediction(self, analysis: Analysis, predicted: SketchUpdate | None = None, seed: int = 0,
                            num_steps: int = DEFAULT_NUM_STEPS, conditioning: str | None = None,
                            should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        """Per box: the model's input, the decoded TRUE features, the decoded PREDICTION (same noise, same
        decoder) and the per-patch prediction error. Without a decoder only the input and the error map are shown.

        ``predicted``: finished sketches with this seed, conditioning and step count, whose first sample is reused
        instead of decoding again. ``should_stop``: as in ``stream_sketches``.
        """
        truth = prediction = None
        conditioning = self.conditioning_of(conditioning)
        if conditioning is not None:
            truth = self.decode_truth(analysis, seed, num_steps, conditioning, should_stop)
            if (predicted is not None and predicted.done and predicted.seed == seed
                    and predicted.conditioning == conditioning and predicted.num_steps == num_steps
                    and 0 in predicted.sample_indices):
                prediction = predicted.box_images[predicted.sample_indices.index(0)]
            else:
                prediction = self.sketches(analysis, 1, seed, num_steps, conditioning, should_stop).box_images[0]
        return render_truth_vs_prediction(analysis, truth, prediction, self.patch_size)

    def surprise_map(self, image: Image.Image | np.ndarray | str | Path | PreparedImage,
                     window: int | None = None, stride: int | None = None) -> SurpriseMap:
        """Prediction error of a window sliding over the whole image (see ``ijepa.inference.surprise_map``)."""
        prepared = image if isinstance(image, PreparedImage) else self.prepare(image)
        grid = self.model.config.grid_size
        window = window if window is not None else default_window(grid)
        if not 1 <= window < min(grid):
            raise InputError(f"The window must be 1 to {min(grid) - 1} patches wide, got {window}.")
        stride = stride if stride is not None else max(1, window // 2)
        key = (hashlib.sha1(prepared.pixels.numpy().tobytes()).hexdigest(), window, stride)
        with self._surprise_lock:
            if key in self._surprise_cache:
                self._surprise_cache.move_to_end(key)
                return self._surprise_cache[key]
        errors = surprise_map(self.model, prepared.pixels, window, stride).numpy()
        result = SurpriseMap(errors, (window, window), stride, render_surprise(prepared.to_uint8(), errors, window))
        with self._surprise_lock:
            self._surprise_cache[key] = result
            while len(self._surprise_cache) > SURPRISE_CACHE_SIZE:
                self._surprise_cache.popitem(last=False)
        return result

    def feature_view(self, image: Image.Image | np.ndarray | str | Path | PreparedImage) -> np.ndarray:
        """The image beside the PCA of its patch features (target encoder) shown as RGB."""
        prepared = image if isinstance(image, PreparedImage) else self.prepare(image)
        features = true_features(self.model, prepared.pixels.unsqueeze(0).to(self.device))[0].float().cpu()
        rgb = feature_pca(features, self.model.config.grid_size).numpy()
        return render_feature_view(prepared.to_uint8(), rgb)


def shown_path(path: str) -> str:
    """A path as the page shows it: relative to the working folder when inside it (a shared page need not show where
    the server keeps its files), else as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else path


__all__ = [
    "DECODER_NAMES", "DEFAULT_NUM_SAMPLES", "MAX_NUM_SAMPLES", "MAX_NUM_STEPS", "Analysis", "BoxReport", "Engine",
    "InputError", "ModelInfo", "Neighbour", "SketchUpdate", "SurpriseMap",
]
