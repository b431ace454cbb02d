"""I-JEPA, visible: draw a box, see what the predictor expects there (Gradio UI only).

The UI imports no model code: ``main`` loads the models with ``ijepa.app_functions.load_app_functions`` and hands
the bound functions to ``build_app``; everything computed comes from them (``ijepa/app_functions.py``, which the
engine in ``ijepa/engine.py`` and the panels in ``ijepa/panels.py`` serve).

    python app.py                                              # built-in model from assets/, http://127.0.0.1:7860
    python app.py --checkpoint IN1K-vit.h.14-300e.pth.tar      # an official checkpoint (add --decoder DIR for sketches)
    python app.py --assets /path/to/bundle --port 7861         # another bundle

The same results are available to programs through the "/sketch" endpoint::

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    sketches, metrics = client.predict(handle_file("photo.jpg"), "[[120, 80, 260, 200]]", 4, 0, api_name="/sketch")
    # optional: decoder="spatial_context" or "pooled" (as in the I-JEPA paper), steps=10 (sampler steps); without
    # decoder=, the first --decoder given, else the bundle's spatial_context one

``sketches`` is a list of gallery items, one sheet per sketch: the sketch composited into the model's view
(enlarged, boxes outlined) beside enlarged crops of each box. ``metrics`` is a dict with, per box, the prediction
error, the probe's top-5 labels, the nearest reference boxes and whether the box was clipped to the model's view.
Bad input comes back as ``AppError`` with a message saying what to change; anything else is a bug, reported as one
and logged with its traceback.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import socket
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import gradio as gr
import numpy as np
from gradio import processing_utils
from gradio_client import handle_file
from gradio_image_annotation import image_annotator
from PIL import Image

from ijepa.errors import InputError, WorkStopped  # no torch: ijepa's models load only when main() asks for them

if TYPE_CHECKING:
    from ijepa.app_functions import AppFunctions

logger = logging.getLogger("app")

MAX_FILE_SIZE = "20mb"
# The drawing widget shows every image whole, enlarged or reduced with its shape kept to fit a square canvas of this
# side: a 20 px icon and a 4000 px portrait photo both show whole at the same size, with the box tool and the button
# in view, and neither a very wide image nor the widget's rotate buttons change the drawing area's height. The widget
# writes a box's number 20 screen pixels above the box, so the image keeps LABEL_MARGIN canvas pixels free around it:
# enough while the widget is at least 270 px wide (it shrinks the canvas to its width). The model reads the file.
CANVAS_SIDE = 480
LABEL_MARGIN = 36
# An upload whose centre square (what the model reads) is less than this share of its longer side gets a warning: on
# the canvas that square is too small to draw in.
MIN_SQUARE_SHARE = 0.25
CANVAS_FILL = (150, 150, 150)  # the canvas around the image: a neutral grey, unlike the dimmed part of the image
QUEUE_SIZE = 32
EXPIRED_IMAGE = ("This image's file has expired on the server (files are kept for a day): upload it again or pick an "
                 "example.")
DRAW_HINT = ("**Draw:** drag on the image. **Move, resize or delete:** the hand icon, then a box (bin icon: delete). "
             "The model reads the bright square only.")
# The widget starts in move mode and keeps a mode until one of its icons is pressed, so a first drag would draw
# nothing: switch it to drawing boxes, as pressing its box icon does, when the page opens and after an upload.
SWITCH_TO_DRAWING = "() => document.querySelector('#annotator button[aria-label=\"Create box\"]')?.click()"
UPLOAD_LABEL = "Upload your own image"  # Gradio names its file input "<label>-upload-button" (data-testid; HEAD)
# Gradio's galleries focus their selected thumbnail whenever their value changes, and focus() scrolls the page to
# it: on a narrow screen every streamed sketch would pull the page away from where the user is. Keep the focus (for
# the arrow keys), drop the scroll. And a phone's side padding and messages.
HEAD = """<script>
// TURN_CLEARS: the drawing widget's rotate buttons change no value and send no event; a turn clears the results
// through the hidden #turned button. And for PRESSED_FOR, the presses of Run and the new images asked for are
// counted as they happen (an image's token reaches the page later).
window.ijepaRunPresses = 0;
window.ijepaImageChanges = 0;
document.addEventListener('click', (event) => {
    const on = (selector) => event.target.closest && event.target.closest(selector);
    if (on('#annotator button[aria-label^="Rotate"]')) {
        window.ijepaImageChanges += 1;
        document.querySelector('#turned')?.click();
    }
    if (on('#examples button.thumbnail-item')) window.ijepaImageChanges += 1;
    if (on('#run')) window.ijepaRunPresses += 1;
}, true);
document.addEventListener('change', (event) => {  // the upload button's file input (Gradio's test id)
    if (event.target.matches && event.target.matches('input[data-testid="UPLOAD_LABEL-upload-button"]')) {
        window.ijepaImageChanges += 1;
    }
}, true);
(() => {
    const focus = HTMLElement.prototype.focus;
    HTMLElement.prototype.focus = function (options) {
        const inGallery = this.closest && this.closest('#sketches, #neighbours, #examples');
        return focus.call(this, inGallery ? {...options, preventScroll: true} : options);
    };
})();
</script>
<style>
/* phones: the page's side padding would take a sixth of the width from the canvas (here, not in CSS: Gradio scopes
   that to the app's container, inside this element) */
@media (max-width: 640px) { .main.fillable.app { padding-left: 8px !important; padding-right: 8px !important; } }
/* phones: messages at the bottom, not over the top of the canvas where a box is drawn next */
@media (max-width: 640px) { .toast-wrap { top: auto !important; bottom: 12px; } }
</style>""".replace("UPLOAD_LABEL", UPLOAD_LABEL)


def clamped(slider: gr.Slider) -> gr.Slider:
    """``slider`` with a value typed into its field outside its range read as the nearest end: Gradio's own check
    raises before the handler runs and marks every output of the event as failed (a window of 9 replaced the
    surprise map by an error badge). The results say the value used (the surprise map's title, the sketches' count
    and captions). On the instance: a subclass of a Gradio component is served as a custom component, whose
    frontend code does not exist."""
    check = slider.preprocess

    def preprocess(payload: float | None) -> float | None:
        return check(payload if payload is None else min(max(payload, slider.minimum), slider.maximum))

    slider.preprocess = preprocess
    return slider


def bring_into_view(selector: str, when: str) -> str:
    """Page script: scroll the element ``selector`` to the top of the window when the JS condition ``when`` (on that
    element, ``e``) holds."""
    return (f"() => {{ const e = document.querySelector('{selector}'); "
            f"if (e && ({when})) e.scrollIntoView({{behavior: 'smooth', block: 'start'}}); }}")


# Where the columns stack (a phone, a tablet), the results lie below the examples and settings: bring them into
# view when the button is pressed, so that the sketches are seen arriving.
SHOW_RESULTS = bring_into_view(
    "#results", "e.getBoundingClientRect().top > document.querySelector('#run').getBoundingClientRect().bottom + 80")
# Which image a press of Run is for (Handlers.run: ``pressed_for``). A press made while a run goes on is held
# (trigger_mode="always_last"), and when that run ends Gradio replays the whole click, this listener too, with the
# page's values of then. A replay has no click of its own (HEAD counts them): it is for an earlier image when another
# was asked for after the press (picked, uploaded or turned, counted as they happen: a press right after a pick,
# before the new image's token reaches the page, is meant for the new image).
PRESSED_SHOWN, PRESSED_EARLIER = "the image shown", "an earlier image"
PRESSED_FOR = f"""() => {{
    const presses = window.ijepaRunPresses, changes = window.ijepaImageChanges;
    if (presses === undefined || presses !== window.ijepaPressesSeen) {{  // a real press
        window.ijepaPressesSeen = presses;
        window.ijepaChangesAtPress = changes;
        return '{PRESSED_SHOWN}';
    }}
    return changes === window.ijepaChangesAtPress ? '{PRESSED_SHOWN}' : '{PRESSED_EARLIER}';
}}"""
# An example picked below the drawing area (on a phone it is a screen further down) changes an image out of view:
# bring the drawing area back into view.
SHOW_DRAWING = bring_into_view("#annotator", "e.getBoundingClientRect().top < 0")

INTRO = """# I-JEPA, visible
Draw a box on the image. The model does not see inside it: it **predicts** a description of the hidden region from
everything around it, shown here as sketches and numbers; two maps of the whole image add how predictable each part is
and how the encoder describes it. The first example is ready with its box: press **Show what the model expects**,
pick another example, or upload your own image (up to {max_boxes} boxes). What the loaded model learnt from, and at
what size it sees an image, is under "About the loaded model"."""

HOW_TO_READ = """
- **Sketches**: a separate decoder turns the predicted description into pictures. Each sketch is one possible
  picture consistent with the prediction; the enlarged crops on the right of each sketch show only the box.
  A briefly trained decoder draws blurry, nearly identical sketches (its average guess); the more images a decoder
  saw, the more its sketches differ from seed to seed (the bundle's model card gives its figures).
- **Sketch decoder** (when a bundle has both): *detailed* decoders see every predicted patch feature and the visible
  surroundings; the *pooled* one sees only the box's average predicted feature, as in the I-JEPA paper's figures, so
  its sketches vary more and show what that average keeps (a face, a flag) rather than where things go.
- **Truth vs prediction**: the same decoder fed the description the model computes when it *does* see the box
  (truth), beside the one it guessed (prediction), and how far apart the two descriptions are, patch by patch.
  Neither picture is the real image: both are the decoder's drawings.
- **What it expects**: the most similar boxes in a reference collection, and a simple classifier's reading of
  the guess. Its percentages are its scores, not the chance that it is right; the model card says how often it is
  (the built-in examples were picked where it reads the hidden emoji right, and most boxes are read less well).
- **Surprise**: how hard each part of the image is to predict from its surroundings (bright = the hardest parts of
  this image; the colour scale is this image's own, so compare images by their colour bars).
- **Features**: patches the model describes alike get similar colours.
"""


@contextmanager
def bugs_reported() -> Iterator[None]:
    """Any exception but an InputError (input the user can change) or WorkStopped (work nobody wants any more) is a
    bug: log its traceback and say so, rather than ask the user to change an input that was fine."""
    try:
        yield
    except (InputError, WorkStopped, gr.Error):
        raise
    except Exception as err:
        logger.exception("internal error")
        raise gr.Error(f"{type(err).__name__}: {err}. This is a bug in the app, not a problem with your input; the "
                       "server's log has the details.", title="Something went wrong") from err


@contextmanager
def user_errors() -> Iterator[None]:
    """``bugs_reported``, and an InputError's message shown as it is (the user can act on it); serving goes on."""
    try:
        with bugs_reported():
            yield
    except InputError as err:
        raise gr.Error(str(err), title="Please adjust the input", print_exception=False) from None


def whole_number(value: float | str | None, what: str) -> int:
    """A number field's value -> int. A cleared field arrives as None, and API callers may send a string ("5",
    "5.0") or a number too large for a float: say what to enter instead of failing."""
    if value is None:
        raise InputError(f"Enter {what} as a whole number: the field is empty.")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if math.isfinite(number) and abs(number) >= 2**31:  # past every field's range, and rounded as a float
        raise InputError(f"Enter {what} as a whole number: {number:g} is far too large.")
    if math.isfinite(number) and number == int(number):
        return int(number)
    raise InputError(f"Enter {what} as a whole number (got {str(value)[:40]}).")


def annotator_input(value: dict | None) -> tuple[np.ndarray, list[list[float]]]:
    """Annotator value -> (upright image, boxes in its pixels, in reading order as the model view numbers them)."""
    if not value or value.get("image") is None:
        raise InputError("Pick an example or upload an image first.")
    image = value["image"]
    if isinstance(image, (str, Path)):  # our own annotator_value, not yet through the widget
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    # the widget's rotate buttons turn its boxes but not the image it returns
    image = turned(np.asarray(image), int(value.get("orientation") or 0))
    return image, drawn_boxes(value)


def drawn_boxes(value: dict) -> list[list[float]]:
    """The boxes of an annotator value, (xmin, ymin, xmax, ymax) on its canvas, in reading order."""
    return in_reading_order([[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in (value.get("boxes") or [])])


def in_reading_order(boxes: list) -> list:
    """(xmin, ymin, xmax, ymax) boxes top to bottom, then left to right: how boxes are numbered everywhere."""
    return sorted(boxes, key=lambda b: (b[1], b[0]))


def check_drawn(boxes: list, max_boxes: int) -> None:
    """The box count checks the model makes (``ijepa.boxes``, worded for any caller), worded for the drawing widget."""
    if not boxes:
        raise InputError("Draw a box on the image first: drag on it. The model needs a region to hide and guess.")
    if len(boxes) > max_boxes:
        raise InputError(f"{len(boxes)} boxes are drawn; at most {max_boxes} at once. Delete some: the hand icon, a "
                         "box, then the bin icon.")


def annotator_value(image: np.ndarray, boxes: list | tuple, colors: tuple[tuple[int, int, int], ...]) -> dict:
    """An image and its boxes for the drawing widget, numbered and coloured (``colors``, in turn) in reading order as
    the results are. The image goes as a PNG file: given an array, the widget would store a lossy WebP copy and send
    that back."""
    boxes = in_reading_order(boxes)
    path = processing_utils.save_img_array_to_cache(np.ascontiguousarray(image),
                                                    cache_dir=processing_utils.get_upload_folder(), format="png")
    return {"image": path, "orientation": 0,
            "boxes": [{"xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1, "label": str(i + 1),
                       "color": list(colors[i % len(colors)])}
                      for i, (x0, y0, x1, y1) in enumerate(boxes)]}


def placement(width: int, height: int) -> tuple[int, int, int, int]:
    """Where ``display_copy`` puts a width x height image on the canvas: (left, top, shown width, shown height). The
    shown sides have the canvas side's parity, so the image is exactly centred and a quarter turn of the canvas puts
    it where the turned image would go: boxes drawn after the widget's rotate buttons map back as well."""
    inner = CANVAS_SIDE - 2 * LABEL_MARGIN
    scale = min(inner / width, inner / height)
    shown = []
    for side in (width, height):
        side = max(1, round(side * scale))
        if (CANVAS_SIDE - side) % 2:
            side = side - 1 if side > 1 else side + 1
        shown.append(side)
    return (CANVAS_SIDE - shown[0]) // 2, (CANVAS_SIDE - shown[1]) // 2, shown[0], shown[1]


def canvas_boxes(boxes: list | tuple, width: int, height: int, back: bool = False) -> list[list[float]]:
    """Boxes in a width x height image's pixels -> where ``display_copy`` shows them on the canvas; ``back``: the
    other way, canvas -> image pixels."""
    left, top, shown_width, shown_height = placement(width, height)
    sx, sy = shown_width / width, shown_height / height
    if back:
        return [[(x0 - left) / sx, (y0 - top) / sy, (x1 - left) / sx, (y1 - top) / sy] for x0, y0, x1, y1 in boxes]
    return [[left + x0 * sx, top + y0 * sy, left + x1 * sx, top + y1 * sy] for x0, y0, x1, y1 in boxes]


def display_copy(image: np.ndarray, model_square: Callable[[int, int], tuple[int, int, int]]) -> np.ndarray:
    """The square canvas the widget shows: the image enlarged (nearest, so its pixels stay crisp) or reduced
    (Lanczos) to fit, centred on CANVAS_FILL where ``placement`` says, with what the model does not read dimmed so
    that nobody draws there. ``model_square(width, height)``: (left, top, side) of the part the model reads."""
    height, width = image.shape[:2]
    left, top, shown_width, shown_height = placement(width, height)
    enlarged = shown_width >= width and shown_height >= height
    resample = Image.Resampling.NEAREST if enlarged else Image.Resampling.LANCZOS
    resized = np.asarray(Image.fromarray(image).resize((shown_width, shown_height), resample))
    # the file's own centre square, scaled: on a small image, a square taken from the resized copy sat half a file
    # pixel off the one the model reads, and refused boxes drawn on the lit part's edge
    square_left, square_top, side = model_square(width, height)
    sx, sy = shown_width / width, shown_height / height
    x0, x1 = round(square_left * sx), round((square_left + side) * sx)
    y0, y1 = round(square_top * sy), round((square_top + side) * sy)
    shown = (resized * 0.35 + 40).astype(np.uint8)
    shown[y0:y1, x0:x1] = resized[y0:y1, x0:x1]
    canvas = np.empty((CANVAS_SIDE, CANVAS_SIDE, 3), np.uint8)
    canvas[:] = CANVAS_FILL
    canvas[top:top + shown_height, left:left + shown_width] = shown
    return canvas


def turned(image: np.ndarray, turns: int) -> np.ndarray:
    """The image turned clockwise by ``turns`` quarter turns, as the widget's rotate button turns it."""
    return np.ascontiguousarray(np.rot90(image, k=-turns)) if turns % 4 else image


API_IMAGE_EXAMPLE = "https://raw.githubusercontent.com/gradio-app/gradio/main/test/test_files/bus.png"
API_BOXES_EXAMPLE = "[[120, 80, 260, 200]]"


def with_api_example(component: gr.components.Component, value: Any, payload: Any = None) -> Any:
    """Set what the API page suggests for an input (gr.File and gr.Textbox suggest a PDF and "Hello!!"). Set on the
    instance: a subclass of a Gradio component makes Gradio write a .pyi file beside this one at import."""
    component.example_value = lambda: value
    component.example_payload = lambda: value if payload is None else payload
    return component


def file_version(path: str) -> int | None:
    """A file's modification time, for caches of what was read from it; InputError once the cleanup deleted it."""
    try:
        return Path(path).stat().st_mtime_ns
    except FileNotFoundError:
        raise InputError(EXPIRED_IMAGE) from None
    except OSError:
        return None  # open_image says what is wrong


def tolerate_expired_copies() -> None:
    """The drawing widget's copy of its image is a served file, which the cleanup deletes after a day; the model
    reads the source file, so a missing copy is no image rather than an error that fails every panel unexplained.
    Set on the widget's class: Gradio rebuilds a session's widget from its arguments whenever a handler updates it,
    so a method set on the instance is lost. Once per process."""
    original = image_annotator.preprocess_image
    if getattr(original, "tolerates_expired", False):
        return

    @functools.wraps(original)
    def preprocess_image(self, image):
        try:
            return original(self, image)
        except FileNotFoundError:
            return None

    preprocess_image.tolerates_expired = True
    image_annotator.preprocess_image = preprocess_image


class Handlers:
    """Widget values in, calls of the app's functions, widget values out. Holds the (read-only) functions, caches of
    what they computed, and which image each browser session shows now (``_shown``)."""

    def __init__(self, functions: AppFunctions):
        self.functions = functions
        # A token per image shown, per session (Gradio's session hash): model work started for an image the page no
        # longer shows stops within a sampler step (``shows``). Gradio's own cancels= left a red "Error" on the panels
        # now and then (1 in 6 to 12 uploads while sketches streamed), though nothing had failed.
        self._shown: dict[str, str] = {}
        self.settings = functions.settings
        self.examples = functions.examples()
        # An image file is decoded once for its load, its run and the maps after it (a photo takes a noticeable part
        # of a second to decode); the decoded arrays are shared between requests, so read-only.
        self._decoded = functools.lru_cache(maxsize=2)(self._decode)
        # The surprise map and feature view depend on the image and window only, not on the boxes: a second run on
        # the same image reuses them (they take seconds on a CPU, and hold up the next run in the queue).
        self._maps = functools.lru_cache(maxsize=4)(self._compute_maps)

    def _compute_maps(self, path: str, modified: int | None, turns: int, window: int) -> tuple:
        return self.functions.maps(turned(self.read_image(path), turns), window)

    def _decode(self, path: str, modified: int | None) -> np.ndarray:
        image = self.functions.open_image(path)
        image.flags.writeable = False
        return image

    def read_image(self, path: str) -> np.ndarray:
        """An image file as upright RGB (cached: a file changed since it was read is read again)."""
        return self._decoded(path, file_version(path))

    def new_image_shown(self, request: gr.Request | None) -> str:
        """A token for the image a session now shows (an example, an upload, a turn): work for the last one stops."""
        token = uuid.uuid4().hex
        if request is not None:
            self._shown[request.session_hash] = token
        return token

    def shows(self, token: str | None, request: gr.Request | None) -> bool:
        """Whether the page still shows the image whose ``token`` an event was sent with (yes without a session, a
        program calling a handler, or for a session that has shown no new image since it opened)."""
        shown = None if request is None else self._shown.get(request.session_hash)
        return shown is None or shown == token

    def forget(self, request: gr.Request) -> None:
        """A closed page's token goes (Blocks.unload)."""
        self._shown.pop(request.session_hash, None)

    def example_items(self) -> list[tuple[np.ndarray, str]]:
        return [(example.image(), example.caption) for example in self.examples]

    def initial_value(self) -> tuple[dict | None, dict | None]:
        """The drawing widget's value and the image source (see ``show``) the page opens with: the first example."""
        if not self.examples:
            return None, None
        example = self.examples[0]
        return self.show(str(example.path), example.boxes)

    def show(self, path: str, boxes: list | tuple = (), turns: int = 0) -> tuple[dict, dict]:
        """An image file for the drawing widget: (its value, the source). The source, {"path", "turns"}, is what the
        model reads, so the app sees the same pixels as the /sketch endpoint for the same file."""
        source = {"path": path, "turns": turns}
        return self.widget_for(turned(self.read_image(path), turns), boxes, source)

    def widget_for(self, image: np.ndarray, boxes: list | tuple, source: dict) -> tuple:
        """(The widget's value, the source) for an image already read from the source: a display copy
        (``display_copy``) with the boxes (image pixels) scaled onto it, numbered as the results number them. No
        change for a widget value that has no file behind it."""
        if source["path"] is None:
            return gr.skip(), gr.skip()
        shown = display_copy(image, self.functions.model_square)
        return annotator_value(shown, canvas_boxes(boxes, image.shape[1], image.shape[0]),
                               self.settings.box_colors), source

    def model_image(self, value: dict | None, source: dict | None) -> tuple[np.ndarray, list[list[float]], dict]:
        """What the model reads: (the image, the boxes as drawn on the widget, the source as now turned). Without a
        source (a widget value a program built with ``annotator_value``, not ``show``) the widget's own image is
        read as it is."""
        if source is None or source.get("path") is None:
            shown, boxes = annotator_input(value)
            return shown, boxes, {"path": None, "turns": 0}
        if not value:
            raise InputError("Pick an example or upload an image first.")
        boxes = drawn_boxes(value)  # the widget's own copy of the image is not needed (and may have expired)
        source = {**source, "turns": (source["turns"] + int(value.get("orientation") or 0)) % 4}
        return turned(self.read_image(source["path"]), source["turns"]), boxes, source

    def model_input(self, value: dict | None, source: dict | None,
                    check_border: bool = True) -> tuple[np.ndarray, list[list[float]], dict]:
        """``model_image`` with the boxes in the image's pixels. InputError for a box drawn wholly on the canvas's
        border (unless not ``check_border``)."""
        image, boxes, source = self.model_image(value, source)
        if source["path"] is None:
            return image, boxes, source
        height, width = image.shape[:2]
        mapped = canvas_boxes(boxes, width, height, back=True)
        for number, (x0, y0, x1, y1) in enumerate(mapped, start=1):
            if check_border and (x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height):
                raise InputError(f"Box {number} lies on the grey border around the image. Draw it on the image.")
        return image, mapped, source

    # What every result panel shows before a run: a new image must not sit beside the last image's results.
    # Order: model view, explanation, sketches, sketch status, truth, neighbours, readout, metrics, surprise, features.
    CLEARED = (None, "Results appear here.", [], "", None, [], "", None, None, None)
    RUN_PANELS = len(CLEARED) - 2  # what a run updates: all but the two maps

    def clear_results(self, new_image: bool) -> tuple:
        """Every result panel cleared once more after a new image (``new_image``, which this resets), queued behind
        the last image's model work, which stops within a sampler step: an update it had already sent can land after
        the clearing the new image made at once. Nothing changes after an upload that was refused."""
        return (*self.CLEARED, False) if new_image else (gr.skip(),) * (len(self.CLEARED) + 1)

    def cleared(self, request: gr.Request = None) -> tuple:
        """Every result panel cleared, and the token of the image turned: after the widget's rotate buttons
        (``TURN_CLEARS``), whose turn the results no longer show (the surprise map of a turned image sat beside
        sketches and figures of the upright one)."""
        return (*self.CLEARED, self.new_image_shown(request))

    def load_example(self, event: gr.SelectData, request: gr.Request = None) -> tuple:
        """The example in the widget, every result panel cleared; last, that a new image is shown (clear_results)
        and its token."""
        example = self.examples[event.index]
        return (*self.show(str(example.path), example.boxes), *self.CLEARED, True, self.new_image_shown(request))

    def load_upload(self, path: str | None, request: gr.Request = None) -> tuple:
        """The uploaded image in the widget, every result panel cleared, its token and the examples with none
        highlighted. A file that is not a usable image gets a warning and changes nothing: the last image, its boxes,
        its results, the work for it and its highlighted example stay."""
        try:
            if path is None:
                raise InputError("No file arrived; try the upload again.")
            with bugs_reported():
                shown = self.show(path)
        except InputError as err:
            gr.Warning(str(err), duration=8)
            return (gr.skip(),) * (5 + len(self.CLEARED))
        height, width = self.read_image(path).shape[:2]  # cached: the decode of ``show``
        _, _, side = self.functions.model_square(width, height)
        if side < MIN_SQUARE_SHARE * max(width, height):
            gr.Warning(f"Image loaded, but the model reads only its centre square, {side}x{side} of its {width}x"
                       f"{height} pixels (bright on the canvas), which is small here. Crop the image to the part you "
                       "want to study and upload that.", duration=10)
        else:
            gr.Info("Image loaded. Drag on it to draw a box. The model reads the bright square at its centre.",
                    duration=5)  # gone by the time the box is drawn and the button (under it on a phone) pressed
        return (*shown, *self.CLEARED, True, self.new_image_shown(request), gr.Gallery(selected_index=None))

    def run(self, value: dict | None, num_samples: float, seed: float, steps: float, conditioning: str | None = None,
            source: dict | None = None, token: str | None = None, pressed_for: str | None = None,
            request: gr.Request = None) -> Iterator[tuple]:
        """The model view, explanation, readout and neighbours first; then sketches as they finish (drawn by the
        decoder of this ``conditioning``, None: the default); then the decoded truth beside the prediction. Input to
        change is shown in the explanation panel, not as an error, and the last results stay. Last in each update:
        whether the run got past its input checks. A run for an image (``token``) the page no longer shows stops
        within one sampler step and changes nothing more, and so does a press made for another image than the one
        shown (``pressed_for`` is PRESSED_EARLIER: a press held while a run went on is sent later, with the page's
        values of then), before its input checks: a press made for the last image must not warn about this one."""
        def stale() -> bool:
            return not self.shows(token, request) or pressed_for == PRESSED_EARLIER

        try:
            WorkStopped.raise_if_asked(stale)
            for update in self._run(value, num_samples, seed, steps, conditioning, source, stale):
                WorkStopped.raise_if_asked(stale)  # between updates; the sampler asks between its steps
                yield *update, True
        except WorkStopped:
            logger.info("A run stopped: its page shows another image now.")
            yield *(gr.skip(),) * self.RUN_PANELS, False
        except InputError as err:  # the last run's results stay: a slip (a box too many) must not throw them away
            gr.Warning(str(err), duration=8)
            message = (f"**Please adjust the input.** {err}\n\n*Any results shown are from the last run that "
                       "could go ahead (its boxes may have been numbered otherwise).*")
            yield gr.skip(), message, *(gr.skip(),) * (self.RUN_PANELS - 2), False

    def renumbered(self, value: dict | None, source: dict | None) -> tuple:
        """The widget with its boxes numbered as the results (and messages) number them, and its source; no change
        where there is nothing to number, or a box count the run will refuse (its message names no box, and the
        last results it keeps go with the labels as they are). A box on the border is numbered: the message names
        it. Called at the press, unqueued: a box drawn while the run waits for the model must not be reset by it."""
        try:
            image, boxes, source = self.model_input(value, source, check_border=False)
            check_drawn(boxes, self.settings.max_boxes)
            return self.widget_for(image, boxes, source)
        except InputError:
            return gr.skip(), gr.skip()

    def _run(self, value: dict | None, num_samples: float, seed: float, steps: float, conditioning: str | None,
             source: dict | None, should_stop: Callable[[], bool]) -> Iterator[tuple]:
        with bugs_reported():
            image, boxes, source = self.model_input(value, source)
            check_drawn(boxes, self.settings.max_boxes)
            analysis = self.functions.analyze(image, boxes)  # the boxes' own checks first: they name the box
            num_samples, seed = whole_number(num_samples, "the number of sketches"), whole_number(seed, "a seed")
            steps = whole_number(steps, "the number of sampler steps")
            for shown in self.functions.run(analysis, num_samples, seed, steps, conditioning, should_stop):
                yield (shown.view, shown.explanation, shown.sketches, shown.status, shown.truth, shown.neighbours,
                       shown.readout, shown.metrics)

    def explore_after_run(self, value: dict | None, window: float, source: dict | None, ran: bool,
                          token: str | None = None, request: gr.Request = None) -> tuple:
        """``explore`` after a run, unless the run stopped at its input checks (its message stands alone) or for a
        new image."""
        return self.explore(value, window, source, token, request) if ran else (gr.skip(), gr.skip())

    def explore(self, value: dict | None, window: float, source: dict | None = None, token: str | None = None,
                request: gr.Request = None) -> tuple:
        """Surprise map and feature view of the whole image (independent of the boxes); nothing without an image,
        and no change for an image (``token``) the page no longer shows."""
        if not self.shows(token, request):
            return gr.skip(), gr.skip()
        try:
            with bugs_reported():
                image, _, source = self.model_image(value, source)
                window = whole_number(window, "a window size")
                maps = (self.functions.maps(image, window) if source["path"] is None
                        else self._maps(source["path"], file_version(source["path"]), source["turns"], window))
        except InputError as err:
            gr.Warning(str(err))
            return None, None
        return maps if self.shows(token, request) else (gr.skip(), gr.skip())

    def api_sketch(self, image: str | None, boxes: str, num_samples: float, seed: float,
                   decoder: str | None = None, steps: float | None = None) -> tuple[list, dict]:
        """The "/sketch" endpoint: image file + JSON boxes (original-image pixels) -> sketches and metrics.
        ``decoder``: a key of DECODER_NAMES among the loaded ones (None or "": the default); ``steps``: the
        sampler's steps (the UI's "Decoder steps"; None: its default), so that seed and steps reproduce a UI result."""
        with user_errors():
            if image is None:
                raise InputError("Send an image file (gradio_client.handle_file(path)).")
            try:
                parsed = json.loads(boxes) if isinstance(boxes, str) else boxes
            except (ValueError, RecursionError) as err:  # JSONDecodeError, an over-long integer, deep nesting
                raise InputError(f"boxes must be a JSON list of [xmin, ymin, xmax, ymax] lists: {str(err)[:200]}") \
                    from None
            if not isinstance(parsed, list):
                raise InputError("boxes must be a JSON list of [xmin, ymin, xmax, ymax] lists")
            num_samples, seed = whole_number(num_samples, "the number of sketches"), whole_number(seed, "a seed")
            steps = whole_number(self.settings.default_num_steps if steps is None else steps,
                                 "the number of sampler steps")
            return self.functions.sketch(image, parsed, num_samples, seed, steps, decoder)


# Gradio keeps every file it serves (uploads, sketches, figures) until the server stops: ~1 MB per run, measured with
# several users. Every hour, files older than a day are deleted, so a demo left running does not fill its disk; the
# examples and the first image shown are Gradio's own and kept.
CACHE_CLEANUP = (3600, 24 * 3600)  # (every, older than) in seconds: gr.Blocks(delete_cache=...)


def build_app(handlers: Handlers, delete_cache: tuple[int, int] = CACHE_CLEANUP) -> gr.Blocks:
    """The UI: inputs on the left, results on the right; every event calls one Handlers method."""
    settings = handlers.settings
    conditionings = [conditioning for _, conditioning in settings.decoders]
    tolerate_expired_copies()
    with gr.Blocks(title="I-JEPA, visible", analytics_enabled=False, delete_cache=delete_cache) as demo:
        gr.Markdown(INTRO.format(max_boxes=settings.max_boxes))
        initial_value, initial_source = handlers.initial_value()
        source = gr.State(initial_source)  # the file the widget's image shows: what the model reads (Handlers.show)
        ran = gr.State(False)  # whether the last run got past its input checks (Handlers.run)
        new_image = gr.State(False)  # a new image is shown and its panels are to be cleared again (clear_results)
        # the shown image's token, as the page holds it when an event is sent (a State is read when the event runs)
        image_token = gr.Textbox("", visible=False)
        # which image the Run button was pressed for (PRESSED_FOR): a press held while a run goes on is sent
        # later with the values of then, and must not run an image picked after it
        pressed_for = gr.Textbox("", visible=False)
        with gr.Row():
            # each column keeps a usable width (the canvas, five tab names): below ~950 px they stack
            with gr.Column(scale=5, min_width=400):
                gr.Markdown(DRAW_HINT, elem_id="draw-hint")
                # no label: a widget's label is drawn over the top of the image, where boxes often start
                annotator = image_annotator(
                    value=initial_value, show_label=False,
                    elem_id="annotator", sources=[], image_type="numpy", image_mode="RGB", show_clear_button=False,
                    show_remove_button=True, show_download_button=False, disable_edit_boxes=True)
                with gr.Row():
                    upload = gr.UploadButton(UPLOAD_LABEL, file_types=["image"], type="filepath",
                                             elem_id="upload", size="md")
                    run = gr.Button("Show what the model expects", variant="primary", elem_id="run")
                gr.Markdown("**Examples** (click one; its box is drawn for you)")
                examples = gr.Gallery(value=handlers.example_items(), show_label=False, columns=3,
                                      allow_preview=False, object_fit="contain", fit_columns=False,
                                      elem_id="examples", format="png", interactive=False)
                with gr.Row():
                    num_samples = clamped(gr.Slider(1, settings.max_num_samples, value=settings.default_num_samples,
                                                    step=1, label="Number of sketches",
                                                    info="each sketch fills every box", elem_id="num-samples"))
                    # no minimum/maximum: Gradio's own bounds check would mark every panel as failed; the
                    # engine's check says what is wrong in the explanation panel. No precision=0 either: Gradio
                    # would round 2.5 to 2 (and 3.5 to 4) while the field kept showing 2.5; whole_number says so
                    seed = gr.Number(value=0, elem_id="seed",
                                     label="Seed (same seed and steps, same sketches)")
                conditioning = gr.Radio(list(settings.decoders),
                                        value=conditionings[0] if conditionings else None, label="Sketch decoder",
                                        visible=len(conditionings) > 1, elem_id="sketch-decoder",
                                        info="Detailed: every predicted patch feature + the visible surroundings. "
                                             "Pooled: only the box's average prediction, as in the I-JEPA paper (more "
                                             "varied).")
                with gr.Accordion("Settings", open=False):
                    steps = clamped(gr.Slider(4, 30, value=settings.default_num_steps, step=1,
                                              label="Decoder steps (more = finer)"))
                with gr.Accordion("About the loaded model", open=False):
                    gr.Markdown(settings.description, elem_id="model-info")
                    if settings.model_card:
                        with gr.Accordion("Model card", open=False):
                            gr.Markdown(settings.model_card, elem_id="model-card")
            with gr.Column(scale=7, min_width=480, elem_id="results"):
                with gr.Tabs(overflow_behavior="wrap"):  # on a phone: two rows of tab names, none behind a menu
                    with gr.Tab("Sketches"):
                        sketch_status = gr.Markdown("", elem_id="sketch-status")
                        gr.Markdown("Each sketch: every box filled by the decoder, beside enlarged crops of the boxes")
                        sketches = gr.Gallery(show_label=False, columns=4, height=440, object_fit="contain",
                                              format="png", preview=True, selected_index=0, elem_id="sketches",
                                              interactive=False)
                    with gr.Tab("Truth vs prediction"):
                        gr.Markdown("Decoded truth vs decoded prediction, and the error per patch")
                        truth = gr.Image(show_label=False, format="png", elem_id="truth", interactive=False,
                                         buttons=["download", "fullscreen"])
                    with gr.Tab("What it expects"):
                        gr.Markdown("A simple classifier (a linear probe, trained on what the model computes when it "
                                    "*does* see a box) reads the prediction; *on the true features* is its reading "
                                    "of what the model computes for the box itself. Below: the reference boxes "
                                    "closest to the prediction.")
                        readout = gr.Markdown(elem_id="readout")
                        gr.Markdown("Nearest reference boxes: cosine similarity around the collection's average, "
                                    "box, label")
                        neighbours = gr.Gallery(show_label=False, columns=3, height="auto",
                                                object_fit="contain", format="png", elem_id="neighbours",
                                                interactive=False)
                    with gr.Tab("Surprise"):
                        gr.Markdown("Prediction error of a window sliding over the image")
                        window = clamped(gr.Slider(1, max(1, settings.grid // 2), value=settings.default_window, step=1,
                                                   label="Window (patches)", elem_id="window"))
                        surprise = gr.Image(show_label=False, format="png", elem_id="surprise", interactive=False,
                                            buttons=["download", "fullscreen"])
                    with gr.Tab("Features"):
                        gr.Markdown("Patch features as colours (their top three principal components)")
                        features = gr.Image(show_label=False, format="png", elem_id="features", interactive=False,
                                            buttons=["download", "fullscreen"])
                with gr.Row():
                    with gr.Column(scale=2, min_width=160):
                        gr.Markdown("**What the model saw** (hidden patches covered)")
                        model_view = gr.Image(show_label=False, format="png", elem_id="model-view", height=256,
                                              interactive=False)
                    with gr.Column(scale=3, min_width=300):  # beside the view where there is room, else below it
                        explanation = gr.Markdown("Results appear here.", elem_id="explanation")
                with gr.Accordion("How to read this", open=False):
                    gr.Markdown(HOW_TO_READ)
                with gr.Accordion("Numbers (JSON)", open=False):
                    metrics = gr.JSON(label="Metrics", elem_id="metrics")

        with gr.Column(visible=False):  # the programmatic endpoint: plain inputs instead of the drawing widget
            # a file, so the model reads its exact pixels (gr.Image would re-encode it)
            api_image = with_api_example(gr.File(label="image file: handle_file('photo.jpg')", type="filepath"),
                                         API_IMAGE_EXAMPLE, handle_file(API_IMAGE_EXAMPLE))
            api_boxes = with_api_example(gr.Textbox(label="boxes: JSON list of [xmin, ymin, xmax, ymax] in image "
                                                        "pixels", value="[[16, 16, 48, 48]]"), API_BOXES_EXAMPLE)
            # no precision=0: Gradio would round 1.5 sketches to 2; whole_number says what is wrong instead
            api_samples = gr.Number(label="num_samples", value=settings.default_num_samples)
            api_seed = gr.Number(label="seed", value=0)
            # text, not a gr.Radio: a name not loaded gets the engine's message (which ones are), not Gradio's
            # "not in the list of choices" and a traceback in the server's log
            api_decoder = gr.Textbox(value=conditionings[0] if conditionings else "",
                                     label=("decoder: " + " or ".join(conditionings)) if conditionings
                                     else "decoder (none loaded)")
            api_steps = gr.Number(label="steps", value=settings.default_num_steps)
            api_sketches = gr.Gallery(label="sketches", format="png")
            api_metrics = gr.JSON(label="metrics")
            api_button = gr.Button("sketch")

        results = [model_view, explanation, sketches, sketch_status, truth, neighbours, readout, metrics, surprise,
                   features]
        # Model work shares one concurrency group: one request at a time uses the CPU/GPU, the rest queue. A press
        # while the previous run (or its surprise map) is still going is kept and runs next, not dropped.
        model_work = dict(concurrency_id="model", concurrency_limit=1)
        # first: a trigger's listeners start in the order they were added, and this one needs no server
        run.click(None, js=SHOW_RESULTS, queue=False)
        run.click(None, None, pressed_for, js=PRESSED_FOR, queue=False)
        run.click(handlers.renumbered, [annotator, source], [annotator, source], api_visibility="private",
                  queue=False)  # at once, not after the run's wait in the queue (Handlers.renumbered)
        run_event = run.click(handlers.run, [annotator, num_samples, seed, steps, conditioning, source, image_token,
                                             pressed_for],
                              [model_view, explanation, sketches, sketch_status, truth, neighbours, readout, metrics,
                               ran], api_visibility="private", trigger_mode="always_last",
                              show_progress_on=[model_view, sketches], **model_work)  # the widget stays drawable
        run_event.success(handlers.explore_after_run, [annotator, window, source, ran, image_token],
                          [surprise, features], api_visibility="private", **model_work)
        # change, not release: a window typed into the slider's field counts too; only the last pending one runs
        window.change(handlers.explore, [annotator, window, source, image_token], [surprise, features],
                      api_visibility="private", trigger_mode="always_last", **model_work)
        # A new image (or a turn) gets a new token: the last image's work stops (Handlers.shows), so its late results
        # cannot land beside the new image.
        turn = gr.Button("Turned", elem_id="turned")  # hidden (CSS); clicked by TURN_CLEARS in HEAD
        turn.click(handlers.cleared, None, [*results, image_token], api_visibility="private", queue=False)
        examples.select(None, js=SHOW_DRAWING, queue=False)  # first, as SHOW_RESULTS
        shown = [annotator, source, *results, new_image, image_token]
        examples.select(handlers.load_example, None, shown, api_visibility="private",
                        concurrency_limit=4).then(handlers.clear_results, new_image, [*results, new_image],
                                                  api_visibility="private", **model_work)
        demo.load(None, js=SWITCH_TO_DRAWING)
        demo.unload(handlers.forget)
        loaded = upload.upload(handlers.load_upload, upload, [*shown, examples], api_visibility="private",
                               concurrency_limit=4)
        loaded.success(None, js=SWITCH_TO_DRAWING)
        loaded.success(handlers.clear_results, new_image, [*results, new_image], api_visibility="private",
                       **model_work)
        api_button.click(handlers.api_sketch, [api_image, api_boxes, api_samples, api_seed, api_decoder, api_steps],
                         [api_sketches, api_metrics], api_name="sketch",
                         api_description="Sketches of what the predictor expects in each box, with metrics. Send "
                                         "the image as handle_file('photo.jpg') and the boxes as JSON in its pixels.",
                         **model_work)
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return demo


def port_problem(host: str, port: int) -> str | None:
    """Why the app could not listen on ``host:port`` (another server has it, or the address is not this machine's),
    or None."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            return f"cannot listen on {host}:{port} ({err.strerror}): pass another --port (or --host)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="I-JEPA, visible: draw a box, see what the predictor expects.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--assets", type=Path, help="bundle folder (model, decoder, probes, bank, examples; default: "
                        "the built-in one in assets/)")
    parser.add_argument("--checkpoint", type=Path, help="another model: official .pth.tar or our model folder")
    parser.add_argument("--decoder", type=Path, action="append", help="a SketchDecoder folder (save_pretrained) "
                        "for that model; repeat it for a second kind (spatial_context and pooled), the first is the "
                        "default")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N or mps")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="the sketch decoder's autocast: auto = bf16 where it is native (CUDA, CPUs with "
                             "AVX512-BF16 or AMX), else fp32")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be between 1 and 65535, got {args.port}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    problem = port_problem(args.host, args.port)  # now, not after the models have loaded
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    from ijepa.app_functions import load_app_functions  # the models: here, not at import
    from ijepa.checkpoint import CheckpointError

    try:
        functions = load_app_functions(args.assets, checkpoint=args.checkpoint, decoder=args.decoder,
                                       device=args.device, precision=args.precision)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    functions.warm_up()  # outside the try: a failure here is a bug, with its traceback, not a setting to change
    demo = build_app(Handlers(functions))
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_FILE_SIZE,
                run_history=False, footer_links=["api", "gradio"], css=CSS, head=HEAD)
    return 0


CSS = """
#model-view img, #sketches img, #neighbours img { image-rendering: pixelated; }
#turned { display: none !important; }
#explanation { font-size: 0.95em; }
/* every example, and every box's neighbours, in view: no scrolling inside the gallery, no blank below */
#examples .grid-wrap, #neighbours .grid-wrap { min-height: 0; height: auto; max-height: none; }
/* whole captions, wrapped inside their thumbnail, not cut to "passport con..." */
#examples .caption-label, #neighbours .caption-label { white-space: normal; max-width: calc(100% - 8px); }
/* the square canvas at most about half the window high, so that the button under it is in view on a laptop */
#annotator { max-width: max(300px, 50vh - 24px); margin-left: auto; margin-right: auto; }
/* phones: the figures' download and fullscreen buttons above them, not over their titles and figures */
@media (max-width: 640px) {
  #truth .icon-button-wrapper.top-panel, #surprise .icon-button-wrapper.top-panel,
  #features .icon-button-wrapper.top-panel { position: static; width: fit-content; margin: 0 0 4px auto; }
}
/* touch screens: the drawing widget's tool icons big enough for a finger */
@media (pointer: coarse) { #annotator .canvas-control button.icon { width: 40px; height: 40px; padding: 8px; } }
"""

if __name__ == "__main__":
    raise SystemExit(main())
