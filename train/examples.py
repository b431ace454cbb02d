"""The bundle's example images: held-out emoji scenes with a box the app's gallery pre-draws. Replaces the bundle's
examples/ and rewrites its metrics.json and MODEL_CARD.md (the default bundle is the shipped assets/).

    python -m train.examples --bundle assets     # choose them again for a bundle's model, rewrite metrics and card

``train.default`` calls ``choose_examples`` when it writes a bundle. A scene is kept where the bundle's probes, read
on the predictor's output for the box, name the hidden emoji's group and subgroup (the two the app's explanation
quotes): the gallery is the first thing a user sees, so it shows what the predictor gets right, and the model card
states how many scenes that took.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from decoder import largest_user_box
from ijepa.boxes import boxes_to_masks
from ijepa.bundle import (EXAMPLES_DIR, EXAMPLES_INDEX, MODEL_CARD_NAME, MODEL_DIR, PROBE_NAMES, bundle_metrics_path,
                          load_probe)
from ijepa.checkpoint import load_model
from ijepa.inference import LinearReadout, analyze_boxes, prepare_image
from ijepa.model import IJepa
from train.config import doc_summary, run_command
from train.model_card import write_model_card
from train.runtime import read_json, save_folder_atomic, write_json_atomic

logger = logging.getLogger("train.examples")


def choose_examples(bundle: Path, directory: Path) -> dict:
    """``render_examples`` into ``directory`` for the model and probes already in ``bundle``: the fp16 weights the
    app will run, so the examples read there as they did here. A bundle without a subgroup probe is chosen by its
    group probe alone."""
    model = load_model(bundle / MODEL_DIR)
    probes = {name: load_probe(bundle / f"probe_{name}.safetensors", model.config.embed_dim, model)
              for name in PROBE_NAMES if (bundle / f"probe_{name}.safetensors").is_file()}
    if "group" not in probes:
        raise FileNotFoundError(f"{bundle / 'probe_group.safetensors'} is missing: the examples are chosen by what the "
                                "group probe reads (python -m train.eval writes it; train.default puts it in a bundle)")
    return render_examples(model, directory, probes["group"], probes.get("subgroup"))


def render_examples(model: IJepa, directory: Path, group_probe: LinearReadout,
                    subgroup_probe: LinearReadout | None = None, count: int = 6, scale: int = 4, seed: int = 31337,
                    max_scenes: int = 300) -> dict:
    """Held-out emoji scenes, upscaled for drawing, each with a box over the top half of its main emoji (its middle
    part where the emoji is wider or taller than the boxes the sketch decoders learnt to fill, ``largest_user_box``).

    A scene is kept where the probes, read on the predictor's output for the box (what the app's explanation quotes),
    name the hidden emoji's Unicode group and subgroup, so that the first thing a user sees is what the predictor
    does get right; scenes read right by the group probe alone fill in next, misses last, only if too few are found.
    One example per group comes before any group repeats (flags read right far more often than the rest and would
    fill the gallery). Returns how many scenes were looked at and how many each reading got right, which the model
    card states beside the examples."""
    from train.emoji import EmojiScenes, get_catalog  # the font is looked up when a bundle is written, not at import

    catalog = get_catalog()
    size, patch = model.config.img_size, model.config.patch_size
    scenes = EmojiScenes(catalog, resolution=size, patch_size=patch, split="heldout", seed=seed, num_distractors=(0, 1))
    by_rank: tuple[list, list, list] = ([], [], [])  # misses, group read right, group and subgroup read right
    scanned, index = 0, 0
    best = 2 if subgroup_probe is not None else 1
    max_rows, max_cols = largest_user_box(model.config.grid_size)
    while (len({entry["group"] for _, entry in by_rank[best]}) < count and scanned < max_scenes
           and index < 20 * max_scenes):  # bounded for any scene settings
        item = scenes[index]
        index += 1
        cells = torch.nonzero(item["patch_emoji"] == item["emoji"])
        if len(cells) < 6:
            continue
        (r0, c0), (r1, c1) = cells.min(0).values.tolist(), cells.max(0).values.tolist()
        rows = min(max(1, (r1 - r0 + 1) // 2), max_rows)
        cols = min(c1 - c0 + 1, max_cols)
        c0 += (c1 - c0 + 1 - cols) // 2  # the middle of a wide emoji
        scanned += 1
        box = [c0 * patch, r0 * patch, (c0 + cols) * patch, (r0 + rows) * patch]
        pixels = (item["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        image = Image.fromarray(pixels).resize((size * scale, size * scale), Image.NEAREST)
        group = catalog.group_names[int(catalog.group_of[item["emoji"]])]
        pooled = predicted_pooled(model, image, box)
        entry = {"boxes": [[v * scale for v in box]], "caption": catalog.names[item["emoji"]],
                 "group": group, "probe_reads": group_probe.top_k(pooled, 1)[0][0]}
        rank = int(entry["probe_reads"] == group)
        if subgroup_probe is not None:
            entry.update(subgroup=catalog.subgroup_names[int(catalog.subgroup_of[item["emoji"]])],
                         subgroup_probe_reads=subgroup_probe.top_k(pooled, 1)[0][0])
            rank += int(rank == 1 and entry["subgroup_probe_reads"] == entry["subgroup"])
        by_rank[rank].append((image, entry))
    shown = one_per_group_first(by_rank[2] + by_rank[1], by_rank[0], count)
    directory.mkdir(parents=True, exist_ok=True)
    examples = []
    for number, (image, entry) in enumerate(shown):
        name = f"example_{number}.png"
        image.save(directory / name)
        examples.append({"file": name, **entry})
    (directory / EXAMPLES_INDEX).write_text(json.dumps(examples, indent=2) + "\n")
    chosen = {"scanned": scanned, "read_right": len(by_rank[1]) + len(by_rank[2]), "shown": len(shown),
              "shown_read_right": sum(entry["probe_reads"] == entry["group"] for _, entry in shown)}
    if subgroup_probe is not None:
        chosen["read_right_subgroup_too"] = len(by_rank[2])
        chosen["shown_read_right_subgroup_too"] = sum(entry["probe_reads"] == entry["group"]
                                                      and entry["subgroup_probe_reads"] == entry["subgroup"]
                                                      for _, entry in shown)
    return chosen


def one_per_group_first(right: list, missed: list, count: int) -> list:
    """``count`` of the (image, entry) pairs, best first: the right ones of groups not shown yet, then the remaining
    right ones, then misses, each in the order given."""
    varied, repeats, groups = [], [], set()
    for pair in right:
        (repeats if pair[1]["group"] in groups else varied).append(pair)
        groups.add(pair[1]["group"])
    return (varied + repeats + missed)[:count]


@torch.no_grad()
def predicted_pooled(model: IJepa, image: Image.Image, box: list[float]) -> torch.Tensor:
    """The predictor's pooled output for ``box`` (model pixels), which the probes read, seen the way the app sees
    the saved image."""
    prepared = prepare_image(image, model.config.img_size)
    context, targets = boxes_to_masks([box], (model.config.img_size,) * 2, model.config.grid_size)
    return analyze_boxes(model, prepared.pixels, context, targets).boxes[0].pooled_predicted


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=doc_summary(__doc__))
    parser.add_argument("--bundle", default="assets", help="a folder exported by python -m train.default --export")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    bundle = Path(args.bundle)
    metrics_path = bundle_metrics_path(bundle)
    # read before anything is replaced: a damaged metrics.json must leave the bundle as it was
    metrics = read_json(metrics_path, f"nothing was changed. Write the bundle again from its run: python -m "
                                      f"train.default --out-dir <its run folder> --export {bundle}")
    chosen: dict = {}
    save_folder_atomic(lambda staged: chosen.update(choose_examples(bundle, staged)), bundle / EXAMPLES_DIR)
    metrics = {**metrics, "examples": chosen}
    write_json_atomic(metrics_path, metrics)
    write_model_card(metrics, bundle / MODEL_CARD_NAME)
    logger.info("%s: %d examples; of %d scenes, %d read right by the group probe, %s by the subgroup probe too",
                bundle / EXAMPLES_DIR, chosen["shown"], chosen["scanned"], chosen["read_right"],
                chosen.get("read_right_subgroup_too", "none asked"))


if __name__ == "__main__":
    raise SystemExit(run_command(main))
