"""The I-JEPA objective, its optimisation schedules and parameter groups: the official values, the official shapes."""
import io
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from ijepa.masks import apply_masks
from ijepa.model import IJepa, IJepaConfig
from train.objective import (TargetFeatures, ema_momentum, ema_update, ijepa_loss, learning_rate, param_groups,
                             set_optimizer_schedule, weight_decay)
from train.runtime import fused_adamw, load_optimizer_state

TOTAL, WARMUP = 1000, 100
START_LR, PEAK_LR, FINAL_LR = 2e-4, 1e-3, 1e-6  # the official ViT-H/14 run's values


def test_lr_warms_up_linearly_then_follows_a_cosine_to_its_final_value():
    lrs = [learning_rate(s, TOTAL, WARMUP, START_LR, PEAK_LR, FINAL_LR) for s in range(TOTAL + 1)]
    assert lrs[0] == START_LR and lrs[WARMUP] == pytest.approx(PEAK_LR) and lrs[TOTAL] == pytest.approx(FINAL_LR)
    assert lrs[WARMUP // 2] == pytest.approx((START_LR + PEAK_LR) / 2)  # linear warmup
    assert lrs[WARMUP + (TOTAL - WARMUP) // 2] == pytest.approx((PEAK_LR + FINAL_LR) / 2)  # cosine midpoint
    assert all(a < b for a, b in zip(lrs[:WARMUP], lrs[1:WARMUP + 1]))
    assert all(a >= b for a, b in zip(lrs[WARMUP:], lrs[WARMUP + 1:]))
    assert learning_rate(TOTAL + 50, TOTAL, WARMUP, START_LR, PEAK_LR, FINAL_LR) == pytest.approx(FINAL_LR)


def test_weight_decay_rises_on_a_cosine_from_0_04_to_0_4():
    wds = [weight_decay(s, TOTAL, 0.04, 0.4) for s in range(TOTAL + 1)]
    assert wds[0] == pytest.approx(0.04) and wds[TOTAL] == pytest.approx(0.4)
    assert wds[TOTAL // 2] == pytest.approx(0.22)
    assert wds[TOTAL // 4] == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert all(a <= b for a, b in zip(wds, wds[1:]))


def test_ema_momentum_rises_linearly_from_0_996_to_1():
    assert ema_momentum(0, TOTAL, 0.996, 1.0) == 0.996
    assert ema_momentum(TOTAL // 2, TOTAL, 0.996, 1.0) == pytest.approx(0.998)
    assert ema_momentum(TOTAL, TOTAL, 0.996, 1.0) == 1.0


def test_ema_update_moves_the_target_by_one_minus_momentum():
    target, online = [torch.zeros(3), torch.ones(2, 2)], [torch.ones(3), torch.zeros(2, 2)]
    ema_update(target, online, 0.75)
    torch.testing.assert_close(target[0], torch.full((3,), 0.25))
    torch.testing.assert_close(target[1], torch.full((2, 2), 0.75))


def test_biases_and_1d_parameters_get_no_weight_decay_and_fixed_tables_no_updates():
    model = IJepa(IJepaConfig.from_arch("vit_tiny", img_size=32, patch_size=8, depth=2, predictor_depth=1,
                                        predictor_embed_dim=48))
    decay, no_decay = param_groups([model.encoder, model.predictor])
    names = {id(p): n for m in (model.encoder, model.predictor) for n, p in m.named_parameters()}
    decayed = [names[id(p)] for p in decay["params"]]
    assert decayed and all(p.ndim >= 2 and not names[id(p)].endswith(".bias") for p in decay["params"])
    assert all(p.ndim == 1 or names[id(p)].endswith(".bias") for p in no_decay["params"])
    assert any(n.endswith("norm.weight") for n in map(names.get, map(id, no_decay["params"])))
    assert any(".qkv.weight" in n for n in decayed)
    trainable = [p for m in (model.encoder, model.predictor) for p in m.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)  # every trainable one, once
    assert not any("pos_embed" in n for n in decayed + [names[id(p)] for p in no_decay["params"]])

    optimizer = torch.optim.AdamW(param_groups([model.encoder, model.predictor]), lr=1.0, weight_decay=0.04)
    set_optimizer_schedule(optimizer, lr=5e-4, wd=0.3)
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(5e-4, 0.3), (5e-4, 0.0)]


def test_the_fused_optimizer_steps_as_adamw_over_each_tensor():
    """Training uses torch's fused AdamW on a CPU too: the same weights as the per-tensor loop the official code
    runs, through the schedule's changing lr and weight decay, up to float rounding."""
    def trained(make_optimizer, steps: int = 5) -> tuple[list[torch.Tensor], bool]:
        torch.manual_seed(0)
        model = IJepa(IJepaConfig.from_arch("vit_tiny", img_size=16, patch_size=8, depth=1, predictor_depth=1,
                                            predictor_embed_dim=48)).double()
        optimizer = make_optimizer(param_groups([model.encoder, model.predictor]))
        # float64: gradients that are rounding noise (the key bias's) stay far below eps instead of becoming steps
        images, weights = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.randn(2, 4, 192, dtype=torch.float64)
        for step in range(steps):
            set_optimizer_schedule(optimizer, lr=1e-3 * (step + 1), wd=0.04 + 0.05 * step)
            optimizer.zero_grad()
            (model.encoder(images) * weights).sum().backward()
            optimizer.step()
        trainable = [p.detach().clone() for p in model.encoder.parameters() if p.requires_grad]
        return trainable, optimizer.param_groups[0]["fused"]

    make_fused = partial(fused_adamw, lr=1e-3, weight_decay=0.04)
    (fused, kernel), (start, _) = trained(make_fused), trained(make_fused, steps=0)
    loop, _ = trained(partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.04, foreach=False))
    assert kernel is True
    assert all(not torch.equal(a, b) for a, b in zip(fused, start))  # every tensor trained
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=0)  # steps are 1e-3 to 5e-3


def test_a_checkpoint_of_the_foreach_loop_resumes_on_the_fused_kernel():
    """Checkpoints written before CPU training used the fused kernel saved ``foreach=True``, which plain
    ``load_state_dict`` would restore for the rest of the run; the state itself must come back unchanged."""
    weights = torch.nn.Parameter(torch.randn(4, 3))
    old = torch.optim.AdamW([weights], lr=1e-3, foreach=True)
    weights.grad = torch.randn(4, 3)
    old.step()
    checkpoint = io.BytesIO()
    torch.save(old.state_dict(), checkpoint)
    checkpoint.seek(0)
    resumed = fused_adamw([torch.nn.Parameter(weights.detach().clone())], lr=1e-3, weight_decay=0.0)
    load_optimizer_state(resumed, torch.load(checkpoint, weights_only=True))
    assert (resumed.param_groups[0]["fused"], resumed.param_groups[0]["foreach"]) == (True, None)
    loaded = resumed.state_dict()["state"][0]
    for key, value in old.state_dict()["state"][0].items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    weights.grad = resumed.param_groups[0]["params"][0].grad = torch.ones(4, 3)
    old.step()
    resumed.step()  # the fused kernel takes the loaded state and steps as the loop does
    torch.testing.assert_close(resumed.param_groups[0]["params"][0], weights, rtol=1e-6, atol=1e-7)


def _masks(batch: int, num_patches: int, sizes: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.stack([torch.randperm(num_patches, generator=g)[:k].sort().values for _ in range(batch)])
            for k in sizes]


@pytest.mark.parametrize("num_contexts", [1, 2])
def test_loss_is_the_official_smooth_l1_against_layer_normed_full_image_targets(num_contexts):
    """The official formula, written out: targets from the FULL image through an affine-free LayerNorm, gathered per
    target block and repeated for each context ((target, context, image) order), no gradient to the target encoder."""
    torch.manual_seed(0)
    model = IJepa(IJepaConfig.from_arch("vit_tiny", img_size=32, patch_size=8, depth=2, predictor_depth=1,
                                        predictor_embed_dim=48))
    with torch.no_grad():  # a target encoder unlike the encoder, so a swapped one would show
        for p in model.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images, n = torch.randn(3, 3, 32, 32), 16  # a 4 x 4 grid
    contexts = _masks(3, n, [10] * num_contexts, seed=1)  # the collator cuts all to one length
    targets = _masks(3, n, [4, 4, 4], seed=2)

    loss = ijepa_loss(model.encoder, model.predictor, TargetFeatures(model.target_encoder), images, contexts, targets)

    with torch.no_grad():
        h = model.target_encoder(images)
        h = apply_masks(F.layer_norm(h, (h.size(-1),)), targets)
        h = torch.cat([h[i * 3:(i + 1) * 3] for i in range(len(targets)) for _ in range(num_contexts)])
        z = model.predictor(model.encoder(images, contexts), contexts, targets)
        expected = F.smooth_l1_loss(z, h)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)

    loss.backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.predictor.predictor_proj.parameters())
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
