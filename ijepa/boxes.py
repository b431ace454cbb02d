"""User boxes -> patch indices: the step from a box drawn on an image to the patches the model hides.

``map_boxes`` checks boxes drawn on the user's image (with messages for the person who drew them) and maps them to
the model's square view, clipped to it; ``boxes_to_masks`` snaps those model-pixel boxes outwards to the patch grid:
one target index tensor per box, and the context, every other patch. Masks are raster patch indices to keep, as in
``ijepa/masks.py``, but for one image: [K], where ``masks.py`` has [B, K] (``unsqueeze(0)`` gives that form).
"""
from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Mapping, Sequence, Union

import torch

from .errors import InputError
from .masks import GridSize, as_grid

if TYPE_CHECKING:
    from .inference import PreparedImage

Box = Union[Sequence[float], Mapping[str, float]]
ModelBox = tuple[float, float, float, float]

# Most boxes one request may ask about: each box costs a predictor forward and a decoder batch.
MAX_BOXES = 4
# Boxes may be this much smaller than one patch (rounding in the drawing widget) and still count as one patch.
_MIN_BOX_PATCH_FRACTION = 0.9
# A patch row (column) is hidden when the box covers more than this fraction of its height (width): all of what
# the box holds is hidden but for slivers this thin, a hand-drawn box's overshoot past a patch border.
_MAX_VISIBLE_SLIVER = 0.125


def parse_box(box: Box, number: int = 1) -> ModelBox:
    """A box as [xmin, ymin, xmax, ymax] (list, tuple or array) or a dict with those keys -> four finite floats
    (InputError otherwise)."""
    if isinstance(box, Mapping):
        try:
            values = [box[k] for k in ("xmin", "ymin", "xmax", "ymax")]
        except KeyError as err:
            raise InputError(f"Box {number} needs keys xmin, ymin, xmax, ymax; {err} is missing") from None
    elif isinstance(box, (str, bytes)) or not hasattr(box, "__len__") or len(box) != 4:  # lists, tuples, arrays
        raise InputError(f"Box {number} must be [xmin, ymin, xmax, ymax], got {box!r}")
    else:
        values = list(box)
    try:
        coords = tuple(float(v) for v in values)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer too large for a float
        raise InputError(f"Box {number} must hold four numbers [xmin, ymin, xmax, ymax], got {box!r:.200}") \
            from None
    if not all(math.isfinite(c) for c in coords):
        raise InputError(f"Box {number} has a coordinate that is not a finite number: {box!r}")
    return coords  # type: ignore[return-value]


def map_boxes(prepared: PreparedImage, boxes: Sequence[Box], patch_size: int,
              max_boxes: int = MAX_BOXES) -> list[ModelBox]:
    """Validate user-image boxes and map them to model pixels, clipped to the model's square (so a box running past
    the image's edge, or past the centre square the model sees, keeps its part inside; ``BoxReport.clipped``).

    Raises InputError, with a message for the person who drew them, for: no box, too many boxes, malformed or
    non-finite coordinates, boxes wholly outside the image or the centre square the model sees, and
    boxes smaller than one patch (the smallest region the model can hide).
    """
    if isinstance(boxes, (str, bytes)):
        raise InputError(f"boxes must be a list of [xmin, ymin, xmax, ymax] lists, got the text {boxes!r} "
                         "(parse JSON first)")
    if boxes is None or len(boxes) == 0:
        raise InputError("No box was given: the model needs a region to hide and guess.")
    if all(isinstance(value, numbers.Real) for value in boxes):  # [x0, y0, x1, y1] without the outer list
        raise InputError(f"boxes must be a list of boxes, e.g. [[xmin, ymin, xmax, ymax]]; got one flat list of "
                         f"{len(boxes)} numbers: {list(boxes)!r:.200}")
    if len(boxes) > max_boxes:
        raise InputError(f"{len(boxes)} boxes were given; at most {max_boxes} are allowed at once.")
    width, height = prepared.source_size
    size = prepared.size
    left, top, side = prepared.crop
    patch_px = patch_size / prepared.scale  # one patch, in user-image pixels
    mapped = []
    for number, box in enumerate(boxes, start=1):
        x0, y0, x1, y1 = parse_box(box, number)
        if x1 <= x0 or y1 <= y0:
            raise InputError(f"Box {number} ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty: xmax must exceed xmin and "
                             "ymax must exceed ymin.")
        for lo, hi, extent, axis in ((x0, x1, width, "x"), (y0, y1, height, "y")):
            if hi <= 0 or lo >= extent:
                raise InputError(f"Box {number} ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lies outside the {width}x{height} "
                                 f"image: its {axis} coordinates must overlap 0..{extent}.")
        whole = prepared.to_model((x0, y0, x1, y1))
        mx0, my0, mx1, my1 = (min(max(v, 0.0), float(size)) for v in whole)
        square = (f"the centre square the model sees (x {left:.0f}..{left + side:.0f}, "
                  f"y {top:.0f}..{top + side:.0f} of your image)")
        if mx1 <= mx0 or my1 <= my0:
            raise InputError(f"Box {number} lies outside {square}. Draw it inside that square.")
        too_small = _MIN_BOX_PATCH_FRACTION * patch_size
        if min(mx1 - mx0, my1 - my0) < too_small <= min(whole[2] - whole[0], whole[3] - whole[1]):
            raise InputError(
                f"Only a sliver of box {number}, less than one patch, lies inside {square}: the model sees "
                "nothing of the rest. Move the box into that square.")
        if min(mx1 - mx0, my1 - my0) < too_small:
            raise InputError(
                f"Box {number} is smaller than one patch. The model hides whole patches, a grid of "
                f"{size // patch_size}x{size // patch_size} over the centre square: draw a box at least one grid cell "
                f"wide and high (1/{size // patch_size} of the square's side, {math.ceil(patch_px)} pixels of the "
                "image file).")
        mapped.append((mx0, my0, mx1, my1))
    return mapped


def _relative_box(box: Box, image_size: tuple[int, int]) -> ModelBox:
    """A box inside an image of ``image_size`` (width, height) pixels -> fractions of the image (x0, y0, x1, y1)."""
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be a positive (width, height), got {image_size}")
    x0, y0, x1, y1 = parse_box(box)
    if x1 <= x0 or y1 <= y0:
        raise InputError(f"Degenerate box {box}: need xmax > xmin and ymax > ymin (draw a box with some area)")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise InputError(f"Box {box} lies outside the {width}x{height} image (clip it first: map_boxes does)")
    return x0 / width, y0 / height, x1 / width, y1 / height


def _axis_coverage(lo: float, hi: float, cells: int) -> torch.Tensor:
    """Fraction of each of `cells` equal cells on [0, 1] that the interval [lo, hi] covers."""
    edges = torch.arange(cells + 1, dtype=torch.float64) / cells
    overlap = (edges[1:].clamp(max=hi) - edges[:-1].clamp(min=lo)).clamp_min(0)  # float64 throughout
    return overlap * cells


def box_to_patch_indices(box: Box, image_size: tuple[int, int], grid_size: GridSize) -> torch.Tensor:
    """Raster indices [K] of the model-grid patches a pixel box covers: always a whole rectangle of patches.

    Args:
        box: (xmin, ymin, xmax, ymax) in pixels of an image of ``image_size`` that the model sees whole, stretched
            to its grid (the model's view: ``map_boxes`` gives such boxes for a user's image), inside the image.
        image_size: (width, height) of that image.
        grid_size: model patch grid (height, width) or an int for a square grid.

    The box snaps outwards to the patch grid, so the model sees nothing inside it: a patch row is hidden when the
    box covers more than an eighth of its height, a column likewise, and the row and column under the box centre
    always are. Only a sliver of at most 1/8 patch along an edge can stay visible (overshoot past a border is
    forgiven), and even a one-pixel box selects a patch.
    """
    gh, gw = as_grid(grid_size)
    x0, y0, x1, y1 = _relative_box(box, image_size)
    rows = _axis_coverage(y0, y1, gh) > _MAX_VISIBLE_SLIVER + 1e-9
    cols = _axis_coverage(x0, x1, gw) > _MAX_VISIBLE_SLIVER + 1e-9
    rows[min(int((y0 + y1) / 2 * gh), gh - 1)] = True
    cols[min(int((x0 + x1) / 2 * gw), gw - 1)] = True
    return torch.nonzero((rows[:, None] & cols[None, :]).flatten()).flatten()


def boxes_to_masks(boxes: Sequence[Box], image_size: tuple[int, int],
                   grid_size: GridSize) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Boxes in pixels of the model's view -> (context indices [Kc], one target index tensor per box).

    The context is every patch outside all boxes. Raises InputError when nothing is left for it, since the
    predictor needs something to see.
    """
    if len(boxes) == 0:
        raise InputError("boxes_to_masks needs at least one target box")
    gh, gw = as_grid(grid_size)
    targets = [box_to_patch_indices(box, image_size, (gh, gw)) for box in boxes]
    visible = torch.ones(gh * gw, dtype=torch.bool)
    for target in targets:
        visible[target] = False
    if not visible.any():
        raise InputError("The boxes cover every patch of the image the model sees, leaving no context patch for "
                         "the model to see; draw smaller boxes.")
    return torch.nonzero(visible).flatten(), targets
