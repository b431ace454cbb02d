"""MODEL_CARD.md from a run's measured summary: every figure about the run comes from its JSON (metrics.json in a
bundle), so a card is rewritten, never edited, when the figures change (train.default, train.replace_decoder,
train.examples). The few figures of the project's other runs that put it in context (seeds, the supervised
reference, the 16 x 16 grid) are quoted as such, each with its bench/RESULTS.md section.
"""
from __future__ import annotations

import json
from pathlib import Path

PREDICTION_NAMES = {"sample": "the clean image (x0)", "v_prediction": "v", "epsilon": "the noise (epsilon)"}
# Below this diversity (mean pairwise RMS in the box, [0, 1] units) the card explains why our sketches look alike:
# the recipe's 500-step CPU decoder measured 0.05, one trained on 3x the images 0.13 (bench/RESULTS.md)
LOW_DIVERSITY = 0.1


def _pct(x: float) -> str:
    return f"{x:.1f} %"


def object_gap(feats: dict, objects: dict, floor: float) -> str:
    """Where the kNN floor's points are missing, from the object-only diagnostic: in the object features, or in
    what the background adds to the average (the probe's background carries no label)."""
    if "target_encoder" not in objects:
        return ""
    whole, obj = (round(f["target_encoder"]["knn_group"], 1) for f in (feats, objects))
    return (f" Where the points are missing (the object-only diagnostic above): the floor asks for {_pct(floor)} on "
            f"the whole image; pooled over the emoji's own patches the encoder gives {_pct(obj)} (random init "
            f"{_pct(objects['random_init']['knn_group'])}, raw pixels {_pct(objects['raw_pixels']['knn_group'])}), "
            f"and the background costs the whole-image average {obj - whole:.1f} points more. On the CPU, with the "
            "earlier scenes, length cut that cost (22 points at 57,600 images, 4 at 422,400) while the object-only "
            "figure stayed at 43-49 % up to 576,000 images (bench/RESULTS.md, \"Semantics\"), so past it the floor "
            "needs object features that tell unseen emoji apart better than their pixels do, which no I-JEPA run "
            "here has shown (the supervised reference's do: 58.8 % object-only).")


def floor_gap_note(profile: str, images_seen: int) -> str:
    """What the project's other runs say about the kNN floor (all of them the CPU recipe's model, 422,400 images,
    bench/RESULTS.md), and what to measure next given which profile made this run."""
    next_runs = ("more seeds of this profile (`--seed`), and wider encoders at this length" if profile == "gpu" else
                 "the GPU profile (`train/configs/emoji_gpu.yaml`: the same model on ~2M images in minutes, logging "
                 "this kNN every 1000 steps) with several seeds, and wider encoders at that length")
    return (
        f"What would close the kNN gap (this run saw {images_seen:,} images) is not known yet. The project's other "
        "runs, all with the CPU recipe's model on 422,400 scenes of its world (bench/RESULTS.md), say it is not the "
        "encoder's size or the world: this encoder trained with cross-entropy on the main emoji's group (the still "
        "life, the strict held-out split) scores 58.2 %, 21.1 points above raw pixels, 58.8 % on the emoji's own "
        "patches (\"What do labels buy\"; measured 2026-12-06 with `python bench/supervised_reference.py --out "
        "runs/supervised/still_life_strict_6600.json`; with the earlier scenes and split, 55.8 %). So features that "
        "clear the floor exist for this model on this world, and the I-JEPA objective has not found them at that "
        "length. Single runs do not pin a recipe down: four seeds of the earlier scenes scored 34.2-41.6 % kNN group "
        "and three of the still life 38.0-43.0 % (\"How much of it is the seed?\" and \"Does co-occurrence teach "
        "kinds\"); on the strict held-out split the still-life CPU recipe scored 40.5 % (seed 0, the bundle shipped "
        "on 2026-12-06), 36.7 % (seed 1, level with raw pixels) and 39.4 % (seed 2): a mean of 38.9 %, 1.8 points "
        "above raw pixels (\"The shipped recipe's second seed on the strict split\"). Next to measure: "
        f"{next_runs}, each judged by `python -m train.eval` (at 96,000 images a 384-wide encoder scored 2.5 points "
        "below the 192-wide one, bench/RESULTS.md, \"Semantics\").")


def decoder_images(config: dict) -> int:
    """How many images a decoder run's settings train on."""
    return config.get("steps", 0) * config.get("batch_size", 0)


def decoder_run(config: dict) -> str:
    return f"{decoder_images(config):,} images ({config.get('steps', 0)} steps x batch {config.get('batch_size', 0)})"


def decoder_lead(summary: dict) -> tuple[float, str, str]:
    """Our decoder's retrieval lead over the paper-faithful one when both were trained as long: the shipped pair if
    they were (neither or both trained again alike), else the recipe's own evaluation, kept when a longer decoder
    replaced one; which pair that is; and a line giving the recipe's figures if they are not the table's."""
    recipe = summary.get("recipe_decoders")
    recipe_config = summary.get("recipe_decoder_config", summary.get("decoder_config", {}))
    images = [decoder_images(config) for config in
              (summary.get("decoder_config", {}), summary.get("paper_decoder_config", recipe_config))]
    as_shipped = recipe is None or images[0] == images[1]
    scores = list((summary["decoders"] if as_shipped else recipe)["decoders"].values())
    if len(scores) < 2:
        return float("nan"), "", ""
    lead = scores[0]["retrieval_top1"] - scores[-1]["retrieval_top1"]
    which = "the table's decoders" if as_shipped else "the recipe's pair, below the table"
    if recipe is None:
        return lead, which, ""
    recipe_scores = list(recipe["decoders"].values())
    ours, paper = recipe_scores[0], recipe_scores[-1]
    return lead, which, (f"\nAt the recipe's length, both decoders trained on "
                  f"{decoder_run(recipe_config)} and scored the same way when the bundle was "
                  f"exported: retrieval top-1 {ours['retrieval_top1']:.1f} % (ours) vs {paper['retrieval_top1']:.1f} % "
                  f"(paper), diversity {ours['diversity_rms']:.3f} vs {paper['diversity_rms']:.3f}.\n")


# Per conditioning: what the card calls the decoder, and where metrics.json keeps its training settings and how it
# was retrained (written by train/replace_decoder.py)
DECODER_RECORDS = {"spatial_context": ("ours", "decoder_config", "decoder_retrained"),
                   "pooled": ("the paper-faithful decoder", "paper_decoder_config", "paper_decoder_retrained")}


def retrained_note(summary: dict) -> str:
    """How each decoder was trained again after the recipe (train/replace_decoder.py): "longer" only when it was."""
    lines, kept = [], []
    recipe = summary.get("recipe_decoder_config", {})
    for name, config_key, retrained_key in DECODER_RECORDS.values():
        retrained = summary.get(retrained_key)
        if not retrained:
            kept.append(name)
            continue
        seconds = f"{retrained['train_seconds']:.0f} s of training, " if retrained.get("train_seconds") else ""
        images = [decoder_images(config) for config in (summary[config_key], recipe)]
        how = "longer" if images[0] > images[1] else "as long" if images[0] == images[1] else "shorter"
        lines.append(f"- Then {name} was trained again on this bundle's frozen model, {how}: "
                     f"{decoder_run(summary[config_key])}, `{retrained['command']}` ({retrained['hardware']}, "
                     f"{retrained['date']}; {seconds}{retrained['eval_seconds']:.0f} s to score both decoders), and "
                     f"swapped in with `{retrained['replaced_by']}`.")
    if not lines:
        return ""
    table = f"{kept[0][0].upper()}{kept[0][1:]} is the recipe's; the table below" if kept else "The table below"
    return "\n".join(lines) + f" {table} scores the bundle's two decoders as shipped.\n"


def examples_note(summary: dict) -> str:
    """How the example images were chosen, from what choose_examples returned (bundles before it recorded none)."""
    chosen = summary.get("examples")
    if not chosen or not chosen["scanned"]:
        return ""
    right, scanned, shown = chosen["read_right"], chosen["scanned"], chosen["shown"]
    both = chosen.get("read_right_subgroup_too")  # bundles chosen by the group probe alone have none
    shown_right, shown_both = chosen.get("shown_read_right"), chosen.get("shown_read_right_subgroup_too")
    if both is None:
        which, counts = "group", f"it did in {right} ({100 * right / scanned:.0f} %)"
    else:
        which = "group and subgroup"
        counts = (f"the group probe did in {right} ({100 * right / scanned:.0f} %), both probes in {both} "
                  f"({100 * both / scanned:.0f} %)")
    gallery = ""  # what the gallery holds, where the bundle recorded it
    if shown_right is not None:
        read = f"{shown_right} read right" if shown_both is None else \
            f"{shown_both} read right by both probes, {shown_right - shown_both} by the group probe alone"
        gallery = f" The gallery shows {shown}: {read}, {shown - shown_right} misses."
    return (f"- Examples (`examples/`, the app's gallery, `python -m train.examples`): held-out scenes with a box over "
            f"the top half of the main emoji (at most the largest box the sketch decoders learnt to fill), chosen "
            f"where the probes read the hidden emoji's {which} from the predictor's output (the app's explanation), "
            f"one per group before any group repeats. Of the {scanned} scenes looked at, {counts}.{gallery} So they "
            f"show what the predictor gets right, not how often: that is the \"probe on predicted features\" column "
            "below.\n")


def write_model_card(summary: dict, path: Path, command: str | None = None) -> None:
    """MODEL_CARD.md from the measured summary: every figure in it comes from this run's JSON (the command too,
    unless given)."""
    command = command or summary["command"]
    feats = summary["features"]["features"]
    rows = "\n".join(f"| {name} | {_pct(m['knn_group'])} | {_pct(m['knn_subgroup'])} | {_pct(m['linear_group'])} | "
                     f"{_pct(m['linear_subgroup'])} |" for name, m in feats.items())
    sem = summary["features"].get("predictor_semantics", {})
    sem_rows = "\n".join(f"| {name} | {_pct(m['true_acc'])} | {_pct(m['predicted_acc'])} | {m['ratio']:.2f} |"
                         for name, m in sem.items())
    dec = summary["decoders"]["decoders"]
    unet_precision = summary["decoders"].get("precision", "fp32")  # bundles evaluated before bf16 say none
    dec_rows = "\n".join(f"| {name} | {m['retrieval_top1']:.1f} % (chance {m['chance_top1']:.1f} %, "
                         + (f"a grey box {m['grey_box_top1']:.1f} %, " if "grey_box_top1" in m else "")
                         + f"{m['gallery']} candidates) | {m['reencode_cosine']:.3f} | {m['diversity_rms']:.3f} | "
                         f"{m['max_context_change_8bit']:.0f} |" for name, m in dec.items())
    best_pixels = max(feats["raw_pixels"]["knn_group"], feats["random_init"]["knn_group"])
    margin = feats["target_encoder"]["knn_group"] - best_pixels
    ratio = sem.get("heldout_emoji_group", {}).get("ratio", float("nan"))
    dec_lead, lead_pair, lead_note = decoder_lead(summary)
    objects = summary["features"].get("object_patches_only", {})
    object_rows = "\n".join(f"| {name} | {_pct(m['knn_group'])} | {_pct(m['knn_subgroup'])} |"
                             for name, m in objects.items())
    object_note = "" if not objects else f"""
Diagnostic (not the protocol): the same kNN with features pooled over the emoji's own patches only (the encoders
still see the whole image; raw pixels keep only the emoji's). The gap between this table and the one above is what
the background costs the average.

| features | kNN group | kNN subgroup |
|---|---|---|
{object_rows}
"""
    curve = summary.get("knn_during_pretraining") or []
    curve_note = "" if not curve else (
        "During pretraining (`--knn-every`, the same protocol, `pretrain/knn.csv`), kNN group by images seen: "
        + ", ".join(f"{row['images_seen']:,}: {row['knn_group']:.1f} %" for row in curve) + ".\n")
    pretrain_cfg, decoder_cfg = summary.get("pretrain_config", {}), summary.get("decoder_config", {})
    images_seen = pretrain_cfg.get("steps", 0) * pretrain_cfg.get("batch_size", 0)
    gap_note = "" if margin >= 15 else (
        floor_gap_note(summary["profile"], images_seen) + object_gap(feats, objects, best_pixels + 15) + "\n")
    grid = pretrain_cfg.get("img_size", 0) // max(1, pretrain_cfg.get("patch_size", 1))
    grid_note = "" if grid >= 16 else (
        f"- Patch grid {grid} x {grid}, coarser than the 16 x 16 the default-model issue asks for, so boxes snap to "
        f"{pretrain_cfg.get('patch_size')} px cells. Why (measured on the project's 2-core CPU, bench/RESULTS.md, "
        "\"Semantics\"): a 16 x 16 grid cost 3.9x more per image there and collapsed with this lr and EMA.\n")
    theme_note = "" if not pretrain_cfg.get("theme_prob") else (
        f"- Themed scenes: each distractor shares the main emoji's Unicode {pretrain_cfg.get('theme')} with "
        f"probability {pretrain_cfg['theme_prob']:g}, so what is visible says what kind of emoji is hidden (photos "
        "have such co-occurrence: a plate holds food). The loss never sees a label, but the world is built from the "
        "taxonomy the probes score, so read the kNN figures as what that co-occurrence teaches (bench/RESULTS.md, "
        "\"Semantics\").\n")
    layers = pretrain_cfg.get("target_layers", 1)
    target_note = "" if pretrain_cfg.get("target_norm", "layer") == "layer" else (
        "- Targets: data2vec's, not the paper's. Each feature of the target encoder's "
        + (f"last {layers} blocks" if layers > 1 else "last block") + " is normalised over the image's tokens"
        + (" and the blocks are averaged" if layers > 1 else "") + " before the paper's per-token LayerNorm, so what "
        "every patch of an image shares (its background) is not worth predicting. The objective is still I-JEPA's: "
        "predict the target encoder's features of hidden blocks from the visible context. At 96,000 images of the "
        "earlier scenes this target gained 7.2 points of group kNN over the paper's; at the CPU recipe's full "
        "length with the still life it ended at 34.5 %, below the paper's target (three-seed mean 40.6 %) and raw "
        "pixels, and a probe on true box features read 28.2 % against ~41 % (bench/RESULTS.md, \"Does what the "
        "predictor predicts matter?\" and \"Two more at full length with the still life\"). The official weights "
        "keep the paper's target.\n")
    ours = next(iter(dec.values()))
    x0_note = "" if decoder_cfg.get("prediction_type") != "sample" or ours["diversity_rms"] >= LOW_DIVERSITY else (
        "The decoders predict the clean image and saw few images, so they draw close to their average guess: "
        "blurry, and nearly the same picture for every seed (low diversity); a v-prediction decoder trained this "
        "briefly draws noise instead. Length, not the design, is what limits this: on the shipped CPU model our "
        "decoder trained on 3x the images drew more detail and more variety, and was more faithful too, and 6x "
        "the images more so (bench/RESULTS.md, \"Decoder length\"). To get such a decoder "
        "(~100 min on a 2-core CPU): `python -m train.decoder --checkpoint assets/model --steps 3000 --batch-size 32 "
        "--block-out-channels 32,64,128 --warmup-steps 75 --out-dir runs/decoder_long`, then `python -m "
        "train.replace_decoder --bundle assets --run runs/decoder_long` swaps it into the bundle and rewrites this "
        "card (or try it first: `python app.py --decoder runs/decoder_long/decoder --decoder assets/decoder_paper`).\n")
    recipe_cfg = summary.get("recipe_decoder_config", decoder_cfg)  # what the recipe itself trained both with
    plan, decoder_steps = summary.get("plan") or {}, recipe_cfg["steps"]
    decoders_run = f"the decoders took {decoder_steps} steps each"
    if "planned_decoder_steps" in plan:
        decoders_run = (f"the decoders, refitted to the time left after {plan['spent_before_decoders_s']:.0f} s of "
                        f"pretraining, evaluation and bank, took {decoder_steps} steps each (planned "
                        f"{plan['planned_decoder_steps']})")
    plan_note = "" if not plan else (
        f"- Budget: {plan['budget_s'] / 60:g} minutes. Timed at the start on this machine: "
        f"{plan['pretrain_step_s']:.2f} s per pretraining step, {plan['decoder_step_s']:.2f} s per decoder step "
        f"(timing {plan['timing_s']:.0f} s, counted in the total), so pretraining ran at "
        f"{100 * plan['fraction']:.0f} % of the profile's length; {decoders_run} (train/budget.py).\n")
    code_note = "" if "code" not in summary else f"- Code: this project at commit {summary['code']}.\n"
    card = f"""# Model card: the built-in default I-JEPA (emoji world)

Generated by `train/model_card.py` from the run's own measurements ({summary['date']}); do not edit figures by hand.

## What it is
- An I-JEPA ({pretrain_cfg.get('arch', '?')}, depth {pretrain_cfg.get('depth') or 'default'}, patch
  {pretrain_cfg.get('patch_size', '?')}, {pretrain_cfg.get('img_size', '?')} px; predictor
  {pretrain_cfg.get('predictor_depth', '?')} x {pretrain_cfg.get('predictor_embed_dim', '?')}) pretrained with this
  project's pipeline on **emoji scenes** (Noto Color Emoji composed on varied backgrounds), plus two sketch decoders
  (ours: spatial predicted tokens + visible context; paper-faithful: pooled predicted tokens only), a linear probe
  on true box features (Unicode subgroups and groups) and a reference bank of training-scene boxes.
{grid_note}{theme_note}{target_note}{examples_note(summary)}- Files: `model/` (encoder, target encoder, predictor; fp16 safetensors + config.json), `decoder/`,
  `decoder_paper/`, `probe_*.{{safetensors,json}}`, `bank.{{safetensors,json}}`, `examples/`, `metrics.json`.

## How it was made
- Command: `{command}`
- Profile: {summary['profile']}; hardware: {summary['hardware']}; torch {summary['torch']}.
{code_note}- Pretraining: {pretrain_cfg.get('steps', '?')} steps x batch {pretrain_cfg.get('batch_size', '?')} =
  {images_seen:,} images seen.
- Decoders: {decoder_run(recipe_cfg)} each, predicting
  {PREDICTION_NAMES.get(recipe_cfg.get('prediction_type'), '?')}; the pretrained model stays frozen.
{plan_note}- Wall time per stage (s): {json.dumps(summary['stage_seconds'])}; total {summary['total_seconds']:.0f} s.
{retrained_note(summary)}
## Evaluation (held-out emoji, `python -m train.eval`)
Bank: every training base emoji, queries: every held-out base emoji (2 copies each); kNN k=20, cosine,
temperature 0.07; linear probe on the bank. Labels: Unicode group (9) and subgroup.

| features | kNN group | kNN subgroup | linear group | linear subgroup |
|---|---|---|---|---|
{rows}

Target-encoder kNN (group) minus the better of raw pixels and random init: **{margin:+.1f} points** (floor: +15).
{curve_note}{object_note}
Predictor semantics: a probe trained on TRUE box features, applied to the PREDICTOR's outputs for the same boxes.

| boxes | probe on true features | probe on predicted features | ratio |
|---|---|---|---|
{sem_rows}

Held-out-emoji group ratio: **{ratio:.2f}** (floor: 0.6).

## Decoders (`python -m train.eval_decoder`, held-out emoji scenes, same boxes and seeds, UNet in {unet_precision})

| decoder | re-encode retrieval top-1 | re-encode cosine | diversity (RMS, box) | max context change (8-bit) |
|---|---|---|---|---|
{dec_rows}
{lead_note}
Sample sketches: `samples.png` (rows: input with the box, then each decoder's sketches).
Reading the retrieval column: the sketch is re-encoded in its context, so part of "ours" lead comes from the
context it sees and the paper-faithful decoder never does; that is the point of the design, but it is not a
statement about the box pixels alone. The surroundings alone, with the box filled grey, are the retrieval's real
floor where it is given ("a grey box"), far above uniform chance. Diversity is the mean pairwise RMS distance inside
the box, in [0, 1] units.
{x0_note}
## Floors (from the default-model issue)
- kNN group at least 15 points above raw pixels and random init: {"met" if margin >= 15 else "**not met**"} ({margin:+.1f}).
- Predictor-probe ratio at least 0.6 (held-out emoji, group): {"met" if ratio >= 0.6 else "**not met**"} ({ratio:.2f}).
- Decoder retrieval clearly above the paper-faithful mode, both trained as long: {"met" if dec_lead > 10 else "**not met**"} ({dec_lead:+.1f} points,
  {lead_pair}).

{gap_note}
## Limits
- An emoji-world model is not a photo model: its features describe emoji on flat backgrounds. For photos, load the
  official weights (`python app.py --checkpoint IN1K-vit.h.14-300e.pth.tar`): the prediction-error map, the
  surprise map and the feature view work at once; the probe readout and the nearest neighbours are off (they belong
  to this bundle's model); sketches need a decoder trained for those weights on photos (`python -m train.decoder
  --checkpoint IN1K-vit.h.14-300e.pth.tar --data /path/to/images --out-dir runs/photo_decoder`, then add
  `--decoder runs/photo_decoder/decoder`).
- The decoders were trained on one box at a time. With several boxes, each box's sketch is drawn with the other
  boxes blanked in its surroundings, an input they never saw in training: read multi-box sketches with care.
- The decoders learnt to fill boxes of up to half the image's side; the app flags a larger box, whose sketches go
  beyond what they were trained on.
- Small and briefly trained: see the figures above against the floors before reading much into any one sketch.

## Attribution
Emoji images: rendered from Debian's fonts-noto-color-emoji, built from the Apache-2.0 image sources of
googlefonts/noto-emoji. Labels: Unicode emoji-test.txt. See NOTICE.
"""
    path.write_text(card)
