"""The pictures the app shows besides the sketches: the sketch sheet, surprise map, feature PCA and truth vs
prediction. numpy and Pillow; matplotlib (through its object API, which is thread-safe) where a colour bar helps.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from .engine import Analysis
    from .inference import BoxPrediction

# One colour per box, in box order; the app gives example boxes the same colours.
BOX_COLORS: tuple[tuple[int, int, int], ...] = ((230, 25, 75), (60, 180, 75), (67, 99, 216), (245, 130, 49))
# One colour map for every prediction-error picture (the surprise map and the per-box error maps).
ERROR_CMAP = "inferno"
# What a hidden box shows where no sketch fills it.
HIDDEN_GREY = 128


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor (keeps every model pixel visible as a block)."""
    return image if factor == 1 else np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def patch_bounds(box: BoxPrediction, grid_width: int, patch_size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the patch rectangle a box hides, in pixels of ``patch_size`` (1: in patches)."""
    rows, cols = np.divmod(box.target_indices.numpy(), grid_width)
    return (int(cols.min()) * patch_size, int(rows.min()) * patch_size,
            (int(cols.max()) + 1) * patch_size, (int(rows.max()) + 1) * patch_size)


def sketch_sheet(image: np.ndarray, box_images: np.ndarray, analysis: Analysis, scale: int) -> np.ndarray:
    """One sketch for display: the composite ``image`` enlarged with the hidden regions outlined, then each box's
    region enlarged further in a column on the right, cut from ``box_images[b]`` (that box's own sketch), so a box
    that overlaps another still shows its own sketch."""
    big = Image.fromarray(upscale(image, scale))
    draw = ImageDraw.Draw(big)
    gw = analysis.result.grid_size[1]
    bounds = [patch_bounds(b, gw, analysis.patch_size) for b in analysis.result.boxes]
    for b, (x0, y0, x1, y1) in enumerate(bounds):
        draw.rectangle([x0 * scale - 1, y0 * scale - 1, x1 * scale, y1 * scale],
                       outline=BOX_COLORS[b % len(BOX_COLORS)], width=1)
    side = big.size[1]
    slot = side // len(bounds)
    panel = Image.new("RGB", (side, side), (255, 255, 255))
    for b, (x0, y0, x1, y1) in enumerate(bounds):
        crop = box_images[b][y0:y1, x0:x1]
        factor = max(1, min((slot - 6) // crop.shape[0], (side - 6) // crop.shape[1]))
        tile = Image.fromarray(upscale(crop, factor))
        tile.thumbnail((side - 6, slot - 6), Image.Resampling.NEAREST)  # several large boxes: shrink to fit a slot
        ImageDraw.Draw(tile).rectangle([0, 0, tile.size[0] - 1, tile.size[1] - 1],
                                       outline=BOX_COLORS[b % len(BOX_COLORS)], width=2)
        panel.paste(tile, ((side - tile.size[0]) // 2, b * slot + (slot - tile.size[1]) // 2))
    sheet = Image.new("RGB", (2 * side + 8, side), (255, 255, 255))
    sheet.paste(big, (0, 0))
    sheet.paste(panel, (side + 8, 0))
    return np.asarray(sheet)


def _extent(size: int) -> tuple[float, float, float, float]:
    """Where a coarse map must go to line up with a [size, size] image drawn by imshow (pixel centres at integers)."""
    return -0.5, size - 0.5, size - 0.5, -0.5


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _figure_to_array(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _error_ceiling(errors: np.ndarray) -> float:
    """Top of an error colour scale: the largest error shown, so the map uses the whole scale (a fixed 1.0, the error
    of guessing zeros, left a trained model's maps nearly black); the colour bar gives the values."""
    return max(float(np.nanmax(errors)), 1e-6)


def render_surprise(image: np.ndarray, errors: np.ndarray, window: int) -> np.ndarray:
    """The image beside its surprise map (prediction error per patch) with a colour bar."""
    size = image.shape[0]
    fig = _figure(7.6, 3.6)
    left, right = fig.subplots(1, 2)
    left.imshow(image, interpolation="nearest")
    left.set_title("Model input (centre square)")
    right.imshow(image, interpolation="nearest")
    shown = right.imshow(errors, cmap=ERROR_CMAP, alpha=0.8, extent=_extent(size), interpolation="nearest",
                         vmin=0.0, vmax=_error_ceiling(errors))
    right.set_title(f"Surprise ({window}x{window}-patch window)")
    for axis in (left, right):
        axis.set_xticks([])
        axis.set_yticks([])
    fig.colorbar(shown, ax=right, label="prediction error (0 = exact)", shrink=0.9)
    return _figure_to_array(fig)


def render_feature_view(image: np.ndarray, pca_rgb: np.ndarray) -> np.ndarray:
    """The image beside the PCA of its patch features as RGB (similar colours = similar features)."""
    size = image.shape[0]
    fig = _figure(7.0, 3.6)
    left, right = fig.subplots(1, 2)
    left.imshow(image, interpolation="nearest")
    left.set_title("Model input (centre square)")
    right.imshow(pca_rgb, interpolation="nearest", extent=_extent(size))
    right.set_title("Patch features (PCA as RGB)")
    for axis in (left, right):
        axis.set_xticks([])
        axis.set_yticks([])
    return _figure_to_array(fig)


def render_truth_vs_prediction(analysis: Analysis, truth: np.ndarray | None, prediction: np.ndarray | None,
                               patch_size: int) -> np.ndarray:
    """Rows of boxes; columns: input with the boxes hidden, decoded truth, decoded prediction, per-patch error.
    ``truth`` and ``prediction``: [boxes, S, S, 3], the input with box b filled and the other boxes grey (row b
    shows its own box's decoding, whole even where another box overlaps it)."""
    base = analysis.prepared.to_uint8()
    size = base.shape[0]
    gh, gw = analysis.result.grid_size
    rows = len(analysis.result.boxes)
    columns = [("Box {} hidden (grey)", [analysis.hidden_view()] * rows)]
    if truth is not None and prediction is not None:
        columns += [("Decoded: true features", truth), ("Decoded: prediction", prediction)]
    # small panels and large type: the app shows the figure about 500 px wide, and its titles must stay readable there
    fig = _figure(2.0 * (len(columns) + 1) + 0.7, 2.2 * rows)
    axes = np.asarray(fig.subplots(rows, len(columns) + 1, squeeze=False))
    shown = None
    ceiling = _error_ceiling(np.concatenate([box.errors.numpy() for box in analysis.result.boxes]))
    for r, box in enumerate(analysis.result.boxes):
        x0, y0, x1, y1 = patch_bounds(box, gw, patch_size)
        color = tuple(c / 255 for c in BOX_COLORS[r % len(BOX_COLORS)])
        for c, (title, pictures) in enumerate(columns):
            axes[r, c].imshow(pictures[r], interpolation="nearest")
            axes[r, c].set_title(title.format(r + 1), fontsize=11)
        grid = np.full(gh * gw, np.nan)
        grid[box.target_indices.numpy()] = box.errors.numpy()
        axes[r, -1].imshow(base // 3 + 85, interpolation="nearest")
        shown = axes[r, -1].imshow(grid.reshape(gh, gw), cmap=ERROR_CMAP, vmin=0.0, vmax=ceiling,
                                   interpolation="nearest", extent=_extent(size))
        axes[r, -1].set_title(f"Error per patch: {box.error:.2f}\n(copied average: {box.baseline_error:.2f})",
                              fontsize=11)
        for axis in axes[r]:
            axis.add_patch(_rectangle(x0, y0, x1, y1, color))
            axis.set_xticks([])
            axis.set_yticks([])
    fig.colorbar(shown, ax=axes[:, -1].tolist(), label="error (0 = exact)", shrink=0.8)
    return _figure_to_array(fig)


def _rectangle(x0: float, y0: float, x1: float, y1: float, color: tuple[float, ...]):
    from matplotlib.patches import Rectangle

    return Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5)
