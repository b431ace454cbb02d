"""What the app's result panels show, made from the engine's results (``Analysis``, ``SketchUpdate``): numpy images
and Markdown. Nothing here runs a model; the engine computes, this module presents, ``ijepa/figures.py`` draws. The
truth-vs-prediction, surprise and feature figures come ready-made from the engine, which needs the model to make them.

    analysis = engine.analyze(image, boxes)
    view = panels.model_view(analysis)                          # what the model saw, boxes numbered
    text = panels.explanation(analysis, engine.conditioning_of(None))
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from decoder import largest_user_box

from .bundle import FeatureBank
from .engine import DECODER_NAMES, Analysis, SketchUpdate
from .figures import BOX_COLORS, patch_bounds, sketch_sheet, upscale

DISPLAY_SIDE = 256  # the model's view is enlarged (nearest) to about this many pixels for display
THUMBNAIL_SIDE = 96  # reference-bank thumbnails are enlarged (nearest) to about this many pixels


def display_scale(size: int) -> int:
    """The integer enlargement that shows a ``size``-pixel model view at about DISPLAY_SIDE pixels."""
    return max(1, DISPLAY_SIDE // size)


def model_view(analysis: Analysis) -> np.ndarray:
    """What the model saw: its input enlarged (nearest), hidden patch cells covered in the box's colour with their
    grid drawn, the drawn boxes outlined and numbered."""
    scale = display_scale(analysis.prepared.size)
    view = Image.fromarray(upscale(analysis.prepared.to_uint8(), scale)).convert("RGBA")
    overlay = Image.new("RGBA", view.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    gw = analysis.result.grid_size[1]
    cell = analysis.patch_size * scale
    for b, box in enumerate(analysis.result.boxes):
        color = BOX_COLORS[b % len(BOX_COLORS)]
        for index in box.target_indices.tolist():
            r, c = divmod(index, gw)
            draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1],
                           fill=(*color, 255), outline=(255, 255, 255, 200))  # hidden: not seen
    view = Image.alpha_composite(view, overlay).convert("RGB")
    draw = ImageDraw.Draw(view)
    font = label_font(max(12, 4 * scale))
    for report in analysis.reports:
        x0, y0, x1, y1 = (v * scale for v in report.box_model)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(20, 20, 20), width=max(1, scale // 2))  # as drawn
        draw.text((x0 + 4, y0 + 2), str(report.number), fill=(255, 255, 255), font=font, stroke_width=2,
                  stroke_fill=(20, 20, 20))
    return np.asarray(view)


def sketch_gallery(analysis: Analysis, update: SketchUpdate) -> list[tuple[np.ndarray, str]]:
    """Gallery items: per finished sketch, the composite (enlarged, boxes outlined) beside enlarged crops, captioned
    with what reproduces it, the decoder included (after a switch of decoder the shown sketches are the last run's)."""
    scale = display_scale(analysis.prepared.size)
    pending = "" if update.done else " (the others are still being drawn)"
    decoder = DECODER_NAMES[update.conditioning].split(" (")[0]
    return [(sketch_sheet(image, box_images, analysis, scale),
             f"Sketch {index + 1} of {update.num_samples} · {decoder} decoder · seed {update.seed} · "
             f"{update.num_steps} steps{pending}")
            for image, box_images, index in zip(update.images, update.box_images, update.sample_indices)]


def neighbour_gallery(analysis: Analysis, bank: FeatureBank | None) -> list[tuple[np.ndarray, str]]:
    """Reference-bank thumbnails nearest to each box's prediction, captioned with cosine similarity and label."""
    if bank is None:
        return []
    items = []
    for report in analysis.reports:
        for n in report.neighbours:
            thumb = bank.thumbnails[n.index]
            scale = max(1, THUMBNAIL_SIDE // max(thumb.shape[:2]))
            items.append((upscale(thumb, scale), f"{n.similarity:.2f} · box {report.number}: {n.label}"))
    return items


def readout_markdown(analysis: Analysis, missing: str = "No probe loaded.") -> str:
    """The probes' top-5 reading of each prediction (and what they say about the truth); ``missing`` when the
    bundle has no probe."""
    lines = []
    for report in analysis.reports:
        for name, top in report.probe.items():
            ranked = " · ".join(f"{label} **{p:.0%}**" for label, p in top)
            truth = report.probe_on_truth[name][0]
            lines.append(f"**Box {report.number}, {name}:** {ranked}  \n"
                         f"<small>on the true features: {truth[0]} ({truth[1]:.0%})</small>")
    return "\n\n".join(lines) if lines else f"*{missing}*"


def explanation(analysis: Analysis, conditioning: str | None, num_samples: int | None = None) -> str:
    """A short plain-language account of what the model saw, what it guessed and why sketches differ.

    ``conditioning``: the kind of the decoder that draws the sketches, ``Engine.conditioning_of(requested)``; None
    means there is no decoder (not "the default one"), so the account says nothing about sketches.
    """
    grid = analysis.result.grid_size
    hidden = analysis.num_patches - int(analysis.result.context_indices.numel())
    size = analysis.prepared.size
    plural = "es" if len(analysis.reports) > 1 else ""
    parts = [
        f"**What the model saw.** The centre square of your image, resized to {size}x{size} pixels and cut into "
        f"{grid[0]}x{grid[1]} patches. The {hidden} patches under your box{plural} were hidden (covered "
        f"in the picture); it saw the other {analysis.num_patches - hidden}. A patch a box covers only in part is "
        "hidden whole (unless the box takes less than an eighth of it), so the covered area can be larger than the "
        "box you drew.",
        "**What it guessed.** Not pixels: a list of numbers (features) describing each hidden patch, the kind "
        "of description its encoder gives when it does see the patch. Error 0 = exact guess; for scale, each "
        "box also says how far off a guess is that needs no predictor: the average description of the visible "
        "patches, copied into every hidden one (those descriptions come from the encoder reading the whole picture, "
        "box included, so this comparison guess has an unfair advantage).",
    ]
    parts.extend("- " + _box_line(analysis, b, conditioning is not None) + "." for b in range(len(analysis.reports)))
    if conditioning is not None:
        if num_samples == 1:
            heading = "**Why sketches differ** (draw two or more to compare them)."
        else:
            heading = f"**Why the {f'{num_samples} ' if num_samples else ''}sketches differ.**"
        parts.append(
            f"{heading} A description leaves details open, like a sentence describing a face. The decoder draws "
            "pictures that all fit the guess: what they share is fixed by the predicted description (and, for a "
            "detailed decoder, by the visible surroundings it also sees); what changes is what the description "
            "leaves open. The predictor gives one answer, not a range. The sketches show its expectation; they do "
            "not recover the hidden pixels.")
    if conditioning == "pooled":
        parts.append(
            "**This decoder** gets only the average of the box's predicted features, as in the I-JEPA "
            "paper's figures, and never the visible pixels: its sketches vary more and fit the surroundings "
            "less; what they keep in common is what the average prediction pins down.")
    return "\n\n".join(parts)


def _box_line(analysis: Analysis, b: int, has_decoder: bool) -> str:
    report, box, grid = analysis.reports[b], analysis.result.boxes[b], analysis.result.grid_size
    error, bar = f"{report.error:.2f}", f"{report.baseline_error:.2f}"  # as shown: equal figures read as a tie
    verdict = ("about as good as" if error == bar else
               "better than" if report.error < report.baseline_error else "no better than")
    line = f"Box {report.number}: error **{error}**, {verdict} copying the visible average (which scores {bar})"
    if report.clipped:
        line += " (only its part inside the centre square the model sees was hidden)"
    largest = largest_user_box(grid)
    x0, y0, x1, y1 = patch_bounds(box, grid[1], 1)
    if has_decoder and (y1 - y0 > largest[0] or x1 - x0 > largest[1]):
        line += (f" (larger than the boxes the decoder was trained to fill, {largest[0]}x{largest[1]} patches "
                 "at most: read its sketches as a guess beyond its training)")
    if report.probe:
        readings = ", ".join(f"{name} *{top[0][0]}* ({top[0][1]:.0%})" for name, top in report.probe.items())
        line += f"; the probes read the guess as {readings}"
    if report.neighbours:
        line += "; closest reference boxes: " + ", ".join(dict.fromkeys(n.label for n in report.neighbours[:3]))
    return line


@functools.lru_cache(maxsize=4)
def label_font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` px, loaded once: the model view numbers its boxes with it on every run."""
    return ImageFont.load_default(size=size)
