"""The bundle's example images: held-out emoji scenes with a box the app's gallery pre-draws.

    python -m train.examples --bundle assets     # choose them again for a bundle's model, rewrite metrics and card

``train.default`` calls ``choose_examples`` when it writes a bundle. A scene is kept where the bundle's group probe,
read on the predictor's output for the box, names the hidden emoji's group: the gallery is the first thing a user
sees, so it shows what the predictor gets right, and the model card states how many scenes that took.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ijepa.bundle import EXAMPLES_DIR, EXAMPLES_INDEX, MODEL_DIR, load_probe
from ijepa.checkpoint import load_model
from ijepa.inference import LinearReadout, analyze_boxes, prepare_image
from ijepa.masks import boxes_to_masks
from ijepa.model import IJepa
from train.config import doc_summary
from train.model_card import write_model_card
from train.runtime import save_folder_atomic, write_json_atomic

logger = logging.getLogger("train.examples")


def choose_examples(bundle: Path, directory: Path) -> dict:
    """``render_examples`` into ``directory`` for the model and group probe already in ``bundle``: the fp16 weights
    the app will run, so the examples read there as they did here."""
    model = load_model(bundle / MODEL_DIR)
    probe = load_probe(bundle / "probe_group.safetensors", model.config.embed_dim)
    return render_examples(model, directory, probe)


def render_examples(model: IJepa, directory: Path, group_probe: LinearReadout, count: int = 6, scale: int = 4,
                    seed: int = 31337, max_scenes: int = 300) -> dict:
    """Held-out emoji scenes, upscaled for drawing, each with a box over the top half of its main emoji.

    A scene is kept where ``group_probe``, read on the predictor's output for the box (what the app's readout shows),
    names the hidden emoji's Unicode group, so that the first thing a user sees is what the predictor does get right;
    scenes it misses fill in only if too few are found. Returns how many scenes were looked at and how many were read
    right, which the model card states beside the examples."""
    from train.emoji import EmojiScenes, get_catalog  # the font is looked up when a bundle is written, not at import

    catalog = get_catalog()
    size, patch = model.config.img_size, model.config.patch_size
    scenes = EmojiScenes(catalog, resolution=size, patch_size=patch, split="heldout", seed=seed, num_distractors=(0, 1))
    right, missed, scanned, index = [], [], 0, 0
    while len(right) < count and scanned < max_scenes and index < 20 * max_scenes:  # bounded for any scene settings
        item = scenes[index]
        index += 1
        cells = torch.nonzero(item["patch_emoji"] == item["emoji"])
        if len(cells) < 6:
            continue
        (r0, c0), (r1, c1) = cells.min(0).values.tolist(), cells.max(0).values.tolist()
        rows = max(1, (r1 - r0 + 1) // 2)
        if rows * (c1 - c0 + 1) >= 0.6 * (size // patch) ** 2:
            continue
        scanned += 1
        box = [c0 * patch, r0 * patch, (c1 + 1) * patch, (r0 + rows) * patch]
        pixels = (item["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        image = Image.fromarray(pixels).resize((size * scale, size * scale), Image.NEAREST)
        group = catalog.group_names[int(catalog.group_of[item["emoji"]])]
        read = predicted_group(model, group_probe, image, box)
        entry = {"boxes": [[v * scale for v in box]], "caption": f"{catalog.names[item['emoji']]} (top hidden)",
                 "group": group, "probe_reads": read}
        (right if read == group else missed).append((image, entry))
    shown = right + missed[:count - len(right)]
    directory.mkdir(parents=True, exist_ok=True)
    examples = []
    for number, (image, entry) in enumerate(shown):
        name = f"example_{number}.png"
        image.save(directory / name)
        examples.append({"file": name, **entry})
    (directory / EXAMPLES_INDEX).write_text(json.dumps(examples, indent=2) + "\n")
    return {"scanned": scanned, "read_right": len(right), "shown": len(shown)}


@torch.no_grad()
def predicted_group(model: IJepa, group_probe: LinearReadout, image: Image.Image, box: list[float]) -> str:
    """The group the probe reads from the predictor's output for ``box`` (model pixels), seen the way the app sees
    the saved image."""
    prepared = prepare_image(image, model.config.img_size)
    context, targets = boxes_to_masks([box], (model.config.img_size,) * 2, model.config.grid_size)
    prediction = analyze_boxes(model, prepared.pixels, context, targets).boxes[0]
    return group_probe.top_k(prediction.pooled_predicted, 1)[0][0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=doc_summary(__doc__))
    parser.add_argument("--bundle", default="assets", help="a folder exported by python -m train.default --export")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    bundle = Path(args.bundle)
    metrics_path = bundle / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} is missing: {bundle} is not a bundle exported by train.default")
    chosen: dict = {}
    save_folder_atomic(lambda staged: chosen.update(choose_examples(bundle, staged)), bundle / EXAMPLES_DIR)
    metrics = {**json.loads(metrics_path.read_text()), "examples": chosen}
    write_json_atomic(metrics_path, metrics)
    write_model_card(metrics, bundle / "MODEL_CARD.md")
    logger.info("%s: %d examples, %d of %d scenes read right", bundle / EXAMPLES_DIR, chosen["shown"],
                chosen["read_right"], chosen["scanned"])


if __name__ == "__main__":
    main()
