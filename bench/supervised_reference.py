"""A label-supervised reference for the held-out emoji kNN: what the recipe's encoder reaches when trained on the
very labels the protocol scores, on the same scenes, schedule shape and budget as an I-JEPA run.

    python bench/supervised_reference.py --steps 1500 --warmup-steps 80 --out runs/supervised/group_1500.json
    python bench/supervised_reference.py --out runs/supervised/group_6600.json     # the shipped model's length

Why: the quality floor asks for group kNN 15 points above raw pixels. If a supervised encoder of the same size on
the same images cannot get there either, the gap is the model and world at that horizon, not the I-JEPA objective.

What runs: the config's encoder (``--config``, default the CPU recipe) with a linear head on its mean-pooled tokens,
trained with cross-entropy on the main emoji's Unicode group (or subgroup) of each training scene. Everything else
is the pretraining loop's: ``StepBatches`` data order, ``param_groups`` (no weight decay on biases and 1-D params),
AdamW over warmup + cosine lr and the cosine weight-decay schedule, bf16 autocast where ``--precision auto`` picks
it. The trained encoder is then copied into the target-encoder slot and scored by the unchanged protocol
(``train.eval.evaluate_emoji_features``), with raw-pixel and random-init baselines computed in the same run.
A diagnostic, not a recipe: it keeps no checkpoints, so a killed run starts again.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from ijepa.model import IJepa  # noqa: E402
from train.config import doc_summary, parse_config  # noqa: E402
from train.data import StackFields, StepBatches, build_dataset  # noqa: E402
from train.emoji import get_catalog  # noqa: E402
from train.eval import evaluate_emoji_features  # noqa: E402
from train.objective import learning_rate, param_groups, set_optimizer_schedule, weight_decay
from train.pretrain import SCENE_FIELDS, PretrainConfig, model_config
from ijepa.device import resolve_device, resolve_precision
from train.runtime import autocast, fused_adamw


def train_supervised(cfg: PretrainConfig, label: str, device: torch.device) -> tuple[IJepa, dict]:
    """Train ``IJepa.encoder`` on ``label`` for ``cfg.steps`` steps; return the model and the run's statistics."""
    torch.manual_seed(cfg.seed)
    model = IJepa(model_config(cfg))
    catalog = get_catalog()
    num_classes = len(catalog.group_names if label == "group" else catalog.subgroup_names)
    head = torch.nn.Linear(model.config.embed_dim, num_classes)
    model.to(device)
    head.to(device)
    precision = resolve_precision(device, cfg.precision)
    optimizer = fused_adamw(param_groups([model.encoder, head]), cfg.lr, cfg.weight_decay)
    scenes = build_dataset("emoji", resolution=cfg.img_size, patch_size=cfg.patch_size, seed=cfg.seed,
                           **{name: getattr(cfg, name) for name in SCENE_FIELDS})
    loader = DataLoader(scenes, batch_sampler=StepBatches(0, cfg.steps, cfg.batch_size, 0, 1),
                        num_workers=cfg.num_workers, collate_fn=StackFields(("image", label)))
    model.train()
    start, smooth_loss, smooth_acc, loss_log = time.time(), 0.0, 0.0, []
    bar = tqdm(enumerate(loader), total=cfg.steps, desc=f"supervised on {label}")
    for step, batch in bar:
        set_optimizer_schedule(optimizer,
                               learning_rate(step, cfg.steps, cfg.warmup_steps, cfg.start_lr, cfg.lr, cfg.final_lr),
                               weight_decay(step, cfg.steps, cfg.weight_decay, cfg.final_weight_decay))
        images, labels = batch["image"].to(device), batch[label].to(device)
        with autocast(device, precision):
            logits = head(model.encoder(model.normalize(images)).mean(1)).float()
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:  # the only host syncs
            loss_log.append([step, round(loss.item(), 5)])
            smooth_loss = 0.98 * smooth_loss + 0.02 * loss.item() if step else loss.item()
            correct = (logits.argmax(1) == labels).float().mean().item()
            smooth_acc = 0.98 * smooth_acc + 0.02 * correct if step else correct
            bar.set_postfix(loss=f"{smooth_loss:.3f}", acc=f"{smooth_acc:.3f}")
    stats = {"label": label, "steps": cfg.steps, "warmup_steps": cfg.warmup_steps, "batch_size": cfg.batch_size,
             "images": cfg.steps * cfg.batch_size, "precision": precision, "train_s": round(time.time() - start, 1),
             "final_loss": loss.item(), "final_batch_acc": (logits.argmax(1) == labels).float().mean().item(),
             "loss_log": loss_log}  # [step, batch loss] every log_every steps
    model.target_encoder.load_state_dict(model.encoder.state_dict())
    return model.eval(), stats


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=doc_summary(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "train/configs/emoji_cpu.yaml"),
                        help="pretraining config (model, data; default: the CPU recipe's)")
    parser.add_argument("--steps", type=int, help="training steps (default: the config's)")
    parser.add_argument("--warmup-steps", type=int, help="lr warmup steps (default: the config's)")
    parser.add_argument("--label", choices=("group", "subgroup"), default="group", help="what the head predicts")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N or mps")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the scores and run statistics")
    args = parser.parse_args(argv)
    overrides = ["--config", args.config]
    for flag, value in (("--steps", args.steps), ("--warmup-steps", args.warmup_steps)):
        if value is not None:
            overrides += [flag, str(value)]
    cfg = parse_config(PretrainConfig, overrides)
    device = torch.device(resolve_device(args.device))
    model, stats = train_supervised(cfg, args.label, device)
    results = evaluate_emoji_features(model, seed=cfg.seed, device=str(device),
                                      sources=("raw_pixels", "random_init", "target_encoder"))
    results["supervised"] = stats
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: results[k] for k in ("features", "object_patches_only", "supervised")}, indent=1))
    return results


if __name__ == "__main__":
    main()
