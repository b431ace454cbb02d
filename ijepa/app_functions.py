"""The functions the app is given: the engine's results made into what each panel shows.

``app.py`` imports no model code (as fish-speech's web UI): its ``main`` calls ``load_app_functions`` and hands the
result to the UI, which only moves values between widgets and these functions. Each takes plain values (an RGB
array, boxes in its pixels, whole numbers) and returns panel values (numpy images, Markdown, gallery items, JSON-able
dicts); bad input raises ``ijepa.errors.InputError`` with a message for the user::

    functions = load_app_functions("assets")
    functions.warm_up()
    analysis = functions.analyze(image, [[16, 16, 48, 48]])  # boxes hidden and predicted; InputError for a bad box
    for shown in functions.run(analysis, num_samples=4, seed=0, steps=10):
        print(shown.status)                          # the first sketch, then the others at once, then the truth panel
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from decoder import DEFAULT_NUM_STEPS

from . import panels
from .boxes import MAX_BOXES
from .bundle import DEFAULT_ASSETS, Example
from .engine import DECODER_NAMES, DEFAULT_NUM_SAMPLES, MAX_NUM_SAMPLES, Analysis, Engine
from .figures import BOX_COLORS
from .inference import MAX_IMAGE_PIXELS, centre_square


@dataclass(frozen=True)
class AppSettings:
    """What the UI lays itself out with: the loaded model's grid and decoders, and the limits the engine enforces."""

    grid: int
    default_window: int  # the surprise map's window side when none is chosen
    decoders: tuple[tuple[str, str], ...]  # (name shown, conditioning) of each loaded decoder, the default first
    description: str  # Markdown: what is loaded, and what is missing with how to add it
    box_colors: tuple[tuple[int, int, int], ...]  # box i is drawn in box_colors[i % len(box_colors)] everywhere
    max_boxes: int = MAX_BOXES
    default_num_samples: int = DEFAULT_NUM_SAMPLES
    max_num_samples: int = MAX_NUM_SAMPLES
    default_num_steps: int = DEFAULT_NUM_STEPS
    model_card: str = ""  # Markdown: the bundle's MODEL_CARD.md, "" for a model without one


@dataclass(frozen=True)
class ResultPanels:
    """One update of a run: what each result panel shows (None for the truth panel: not drawn yet)."""

    view: np.ndarray  # what the model saw, hidden patches covered, boxes numbered
    explanation: str  # Markdown
    sketches: list[tuple[np.ndarray, str]]  # gallery items, one sheet per finished sketch
    status: str  # the sketches' progress, or how to get a decoder
    truth: np.ndarray | None  # decoded truth beside the decoded prediction
    neighbours: list[tuple[np.ndarray, str]]  # gallery items: the nearest reference boxes
    readout: str  # Markdown: the probe's reading of each box
    metrics: dict[str, Any]  # JSON-able numbers


class AppFunctions:
    """The app's inference functions, bound to one loaded (read-only) engine: safe to call from many requests."""

    def __init__(self, engine: Engine):
        self.engine = engine
        info = engine.info
        self.settings = AppSettings(
            grid=info.grid, default_window=info.default_window, description=engine.describe(),
            decoders=tuple((DECODER_NAMES[c], c) for c in engine.conditionings), box_colors=tuple(BOX_COLORS),
            model_card=engine.model_card())

    def examples(self) -> list[Example]:
        """The bundle's examples (``ijepa.bundle.Example``: image(), caption, path, boxes in its pixels)."""
        return self.engine.examples

    @staticmethod
    def open_image(path: str | Path) -> np.ndarray:
        """An image file as upright RGB (EXIF rotation applied); InputError for a file that is not a usable image."""
        return np.asarray(Engine.open_image(path))

    @staticmethod
    def model_square(width: int, height: int) -> tuple[int, int, int]:
        """(left, top, side) of the part of a width x height image the model reads: its centre square."""
        return centre_square(width, height)

    def decoder_note(self) -> str:
        return self.engine.note_on(
            "decoder", "No sketch decoder is loaded: pass --decoder DIR (train one with python -m train.decoder).")

    def warm_up(self) -> None:
        """Run every path once, so that the first user does not pay for kernel selection."""
        self.engine.warm_up()

    def analyze(self, image: np.ndarray, boxes: Sequence[Sequence[float]]) -> Analysis:
        """Hide the boxes (the image's pixels) and predict them; InputError for a box the model cannot use."""
        return self.engine.analyze(image, boxes)

    def run(self, analysis: Analysis, num_samples: int, seed: int, steps: int, conditioning: str | None = None,
            should_stop: Callable[[], bool] | None = None) -> Iterator[ResultPanels]:
        """Show an analysis: first everything but the sketches (their status says they are being drawn), then one
        update per batch of finished sketches, then the decoded truth beside the prediction; every update holds all
        the panels. Without a decoder, one update whose truth panel compares the features and whose status says how
        to get one. ``conditioning``: which decoder draws (a key of DECODER_NAMES; None: the default).
        ``should_stop``: asked before every sampler step (the sketches' and the truth's); True raises
        ``WorkStopped``, so a run nobody waits for any more gives the device up within a step, not after its batch."""
        engine = self.engine
        if engine.has_decoder:  # before the first update: a refused seed must not leave "Drawing sketches…" shown
            engine.check_sampling(num_samples, steps, seed)
        shown = ResultPanels(
            view=panels.model_view(analysis),
            explanation=panels.explanation(analysis, engine.conditioning_of(conditioning), num_samples),
            sketches=[], status="Drawing sketches…", truth=None,
            neighbours=panels.neighbour_gallery(analysis, engine.bank),
            readout=panels.readout_markdown(analysis, engine.note_on("probe", "No probe loaded.")),
            metrics=analysis.metrics())
        if not engine.has_decoder:
            yield replace(shown, status=self.decoder_note(), truth=engine.truth_vs_prediction(analysis))
            return
        yield shown
        last = None
        for update in engine.stream_sketches(analysis, num_samples, seed, steps, conditioning, should_stop):
            last = update
            rest = num_samples - len(update.images)
            status = (f"{len(update.images)} of {num_samples} sketch{'es' if num_samples > 1 else ''} in "
                      f"{update.seconds:.1f} s" + ("" if update.done else f", drawing the other {rest} at once…"))
            shown = replace(shown, sketches=panels.sketch_gallery(analysis, update), status=status)
            yield shown
        truth = engine.truth_vs_prediction(analysis, last, seed, steps, last.conditioning, should_stop)
        yield replace(shown, truth=truth, metrics={**shown.metrics, **engine.sketch_metrics(last)})

    def maps(self, image: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole image's surprise map (prediction error of a ``window``-patch square sliding over it) and its
        feature view (patch features' top three principal components as colours)."""
        prepared = self.engine.prepare(image)
        return self.engine.surprise_map(prepared, window).figure, self.engine.feature_view(prepared)

    def sketch(self, image: str | Path, boxes: list, num_samples: int, seed: int, steps: int,
               decoder: str | None = None) -> tuple[list[tuple[np.ndarray, str]], dict[str, Any]]:
        """The programmatic endpoint: an image file and boxes in its pixels -> (sketch sheets, metrics)."""
        engine = self.engine
        analysis = engine.analyze(engine.open_image(image), boxes)
        metrics: dict[str, Any] = {**analysis.metrics(), "model": engine.info.source}
        if not engine.has_decoder:
            return [], {**metrics, "decoder": None, "sketches": self.decoder_note()}
        update = engine.sketches(analysis, num_samples, seed, steps, conditioning=decoder or None)
        return panels.sketch_gallery(analysis, update), {**metrics, **engine.sketch_metrics(update)}


def load_app_functions(assets: str | Path | None = None, checkpoint: str | Path | None = None,
                       decoder: Sequence[str | Path] | None = None, device: str = "auto",
                       precision: str = "auto") -> AppFunctions:
    """Load a bundle (None: the built-in one in assets/) or another model (``Engine.load`` says what each argument
    takes) and bind the app's functions to it. Raises FileNotFoundError, ValueError or CheckpointError with a message
    saying what to change. Sets Pillow's pixel limit for the whole process: the app opens uploads through more than
    one decoder, which must all refuse the same decompression bombs."""
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    engine = Engine.load(DEFAULT_ASSETS if assets is None else assets, checkpoint=checkpoint, decoder=decoder,
                         device=device, precision=precision)
    return AppFunctions(engine)
