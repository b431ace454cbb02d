"""The encoder and predictor: official names, numerical equivalence with timm and a plain reference."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmViT

import ijepa
from ijepa.masks import apply_masks
from ijepa.pos_embed import sincos_2d

BUILDERS = [ijepa.vit_tiny, ijepa.vit_small, ijepa.vit_base, ijepa.vit_large, ijepa.vit_huge, ijepa.vit_giant]


def official_sincos(embed_dim: int, grid: int) -> np.ndarray:
    """The table as the paper's code describes it: meshgrid(w, h), first half from grid[0] (= w)."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid, dtype=float)
    grid_w = np.arange(grid, dtype=float)
    mesh = np.stack(np.meshgrid(grid_w, grid_h), axis=0)
    return np.concatenate([one_d(embed_dim // 2, mesh[0]), one_d(embed_dim // 2, mesh[1])], axis=1).astype(np.float32)


def test_every_name_the_package_exports_resolves():
    """``ijepa`` loads its modules on first use (so that app.py imports no torch): each exported name must load."""
    assert set(ijepa.__all__) == set(ijepa._MODULE_OF)  # each exported name knows its module, and only those
    for name in ijepa.__all__:
        assert getattr(ijepa, name) is not None, name
    assert set(ijepa.__all__) <= set(dir(ijepa))


@pytest.mark.parametrize("dim,grid", [(192, 16), (384, 14), (96, 4)])
def test_sincos_matches_official_layout(dim, grid):
    np.testing.assert_array_equal(sincos_2d(dim, (grid, grid)).numpy(), official_sincos(dim, grid))


def test_first_half_of_channels_encodes_the_column():
    table = sincos_2d(8, (3, 5))
    # patches in the same column share the first half; patches in the same row share the second half
    assert torch.equal(table[1, :4], table[1 + 5, :4])
    assert torch.equal(table[5, 4:], table[6, 4:])


def timm_twin(model: ijepa.VisionTransformer, img_size: int) -> TimmViT:
    block0 = model.blocks[0]
    twin = TimmViT(img_size=img_size, patch_size=model.patch_size, embed_dim=model.embed_dim, depth=len(model.blocks),
                   num_heads=model.num_heads, mlp_ratio=block0.mlp.fc1.out_features / model.embed_dim,
                   qkv_bias=True, class_token=False, global_pool="", num_classes=0, pos_embed="learn")
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.eval()


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_every_builder_equals_timm_vit(builder):
    torch.manual_seed(0)
    model = builder(patch_size=4, img_size=16, embed_dim=32, num_heads=4).eval()
    assert len(model.blocks) == ijepa.VIT_ARCHS[builder.__name__]["depth"]
    names = set(model.state_dict())
    assert {"pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc2.bias",
            "norm.weight"} <= names
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ours = model(images)
        theirs = timm_twin(model, 16).forward_features(images)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_masked_encoder_equals_gathering_inside_the_network():
    torch.manual_seed(0)
    model = ijepa.vit_tiny(patch_size=4, img_size=32, depth=2).eval()
    images = torch.randn(3, 3, 32, 32)
    masks = [torch.stack([torch.randperm(64)[:20].sort().values for _ in range(3)]) for _ in range(2)]
    with torch.no_grad():
        out = model(images, masks)
        x = model.patch_embed(images) + model.pos_embed
        ref = []
        for m in masks:
            tokens = torch.stack([x[b, m[b]] for b in range(3)])
            for blk in model.blocks:
                tokens = blk(tokens)
            ref.append(model.norm(tokens))
    assert out.shape == (6, 20, 192)
    torch.testing.assert_close(out, torch.cat(ref), atol=1e-5, rtol=1e-5)


def test_other_resolution_uses_a_regenerated_table():
    torch.manual_seed(0)
    small = ijepa.vit_tiny(patch_size=4, img_size=32, depth=2).eval()
    large = ijepa.vit_tiny(patch_size=4, img_size=48, depth=2).eval()
    state = {k: v for k, v in small.state_dict().items() if k != "pos_embed"}
    large.load_state_dict(state, strict=False)
    images = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(small(images), large(images))
        assert small(torch.randn(1, 3, 32, 64)).shape == (1, 128, 192)  # non-square works too


def reference_block(block, x):
    """Pre-norm transformer block written out by hand (explicit softmax attention)."""
    attn = block.attn
    b, n, d = x.shape
    h = block.norm1(x)
    qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).view(b, n, 3, attn.num_heads, d // attn.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    x = x + attn.proj((weights @ v).transpose(1, 2).reshape(b, n, d))
    return x + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(x))))


def reference_predictor(pred, context_tokens, context_idx, target_idx, pos=None):
    """One image, one context, one target block: embed, add positions, append queries, run, read queries."""
    pos = pred.predictor_pos_embed[0] if pos is None else pos
    x = pred.predictor_embed(context_tokens) + pos[context_idx]
    queries = pred.mask_token[0] + pos[target_idx]
    x = torch.cat([x, queries])[None]
    for blk in pred.predictor_blocks:
        x = reference_block(blk, x)
    return pred.predictor_proj(pred.predictor_norm(x[0, len(context_idx):]))


@pytest.mark.parametrize("num_context_masks", [1, 2])
def test_predictor_equals_plain_reference(num_context_masks):
    torch.manual_seed(0)
    pred = ijepa.vit_predictor(grid_size=(6, 6), embed_dim=24, predictor_embed_dim=16, depth=2, num_heads=2).eval()
    batch = 3
    context_masks = [torch.stack([torch.randperm(36)[:10].sort().values for _ in range(batch)])
                     for _ in range(num_context_masks)]
    target_masks = [torch.stack([torch.randperm(36)[:5].sort().values for _ in range(batch)]) for _ in range(4)]
    tokens = torch.randn(num_context_masks * batch, 10, 24)
    with torch.no_grad():
        out = pred(tokens, context_masks, target_masks)
        assert out.shape == (4 * num_context_masks * batch, 5, 24)
        pred.last_block_queries_only = False  # the official way, every row through every block (bench reference)
        torch.testing.assert_close(pred(tokens, context_masks, target_masks), out, atol=1e-5, rtol=1e-5)
        row = 0
        for tgt in target_masks:
            for c, ctx in enumerate(context_masks):
                for b in range(batch):
                    ref = reference_predictor(pred, tokens[c * batch + b], ctx[b], tgt[b])
                    torch.testing.assert_close(out[row], ref, atol=1e-5, rtol=1e-5)
                    row += 1


@pytest.mark.parametrize("fused", [True, False])
def test_last_block_computing_only_its_query_rows_matches_the_whole_block(fused):
    """The predictor's last block skips the context rows it would throw away: the kept rows and every gradient
    must be the whole block's, in training mode (stochastic depth on, same seed) and with either attention."""
    from ijepa.vision_transformer import block_output_rows, make_blocks, set_fused_attention
    block = make_blocks(16, 1, 2, 4.0, True, 0.3, torch.nn.LayerNorm)[0].train()
    set_fused_attention(block, fused)
    x = torch.randn(5, 11, 16, requires_grad=True)
    outputs, grads = [], []
    for run in (lambda: block(x)[:, -4:], lambda: block_output_rows(block, x, 4)):
        torch.manual_seed(3)
        out = run()
        out.pow(2).sum().backward()
        outputs.append(out.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in block.parameters()])
        x.grad = None
        block.zero_grad()
    assert outputs[0].shape == outputs[1].shape == (5, 4, 16)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_predictor_at_another_grid_uses_that_grids_positions():
    """Predicting at a resolution other than the model's own must place tokens with that grid's sin-cos positions."""
    torch.manual_seed(0)
    pred = ijepa.vit_predictor(grid_size=(6, 6), embed_dim=24, predictor_embed_dim=16, depth=2, num_heads=2).eval()
    ctx, tgt = torch.randperm(32)[:10].sort().values, torch.randperm(32)[:5].sort().values
    tokens = torch.randn(1, 10, 24)
    with torch.no_grad():
        out = pred(tokens, [ctx[None]], [tgt[None]], grid_size=(4, 8))
        ref = reference_predictor(pred, tokens[0], ctx, tgt, pos=sincos_2d(16, (4, 8)))
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)


def test_predictions_line_up_with_gathered_targets():
    """Row i of the predictor output must be the same (image, block) as row i of apply_masks(targets)."""
    torch.manual_seed(0)
    pred = ijepa.vit_predictor(grid_size=(4, 4), embed_dim=8, predictor_embed_dim=8, depth=1, num_heads=2).eval()
    ctx = [torch.tensor([[0, 1, 2, 3], [12, 13, 14, 15]])]
    tgts = [torch.tensor([[5], [9]]), torch.tensor([[6], [10]])]
    out = pred(torch.randn(2, 4, 8), ctx, tgts)
    targets = apply_masks(torch.arange(16.).view(1, 16, 1).expand(2, -1, -1), tgts)
    assert out.shape[:2] == targets.shape[:2] == (4, 1)
    assert targets.flatten().tolist() == [5.0, 9.0, 6.0, 10.0]


def test_predictor_parameter_names_are_official():
    pred = ijepa.vit_predictor(grid_size=(4, 4), embed_dim=8, predictor_embed_dim=8, depth=2, num_heads=2)
    names = set(pred.state_dict())
    assert {"mask_token", "predictor_pos_embed", "predictor_embed.weight", "predictor_blocks.1.attn.qkv.bias",
            "predictor_norm.weight", "predictor_proj.weight"} <= names
    assert not pred.predictor_pos_embed.requires_grad


def test_block_outputs_are_the_forward_pass_before_its_final_norm():
    encoder = ijepa.vit_tiny(patch_size=8, img_size=32, depth=3).eval()
    images = torch.randn(2, 3, 32, 32)
    outputs = encoder.block_outputs(images, last=2)
    assert len(outputs) == 2
    torch.testing.assert_close(encoder.norm(outputs[-1]), encoder(images))
    with pytest.raises(ValueError, match="last must be 1..3"):
        encoder.block_outputs(images, last=4)


def test_normalize_makes_its_constants_once_per_device_and_dtype(monkeypatch):
    """A training step normalises every batch: constants made from host lists at each call would each be a copy
    that on a GPU waits for all queued work."""
    config = ijepa.IJepaConfig(img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2, predictor_embed_dim=8,
                               predictor_depth=1, predictor_num_heads=2)
    model = ijepa.IJepa(config)
    images = torch.rand(2, 3, 16, 16)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (config.mean, config.std))
    assert torch.allclose(model.normalize(images), (images - mean) / std)

    def host_tensor(*args, **kwargs):
        raise AssertionError("normalize made a tensor from host values again")

    monkeypatch.setattr(torch, "tensor", host_tensor)
    assert torch.allclose(model.normalize(torch.ones(1, 3, 16, 16)), (1 - mean) / std)
    monkeypatch.undo()
    half = model.normalize(images.to(torch.bfloat16))  # another dtype: its own constants, in that dtype
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), (images - mean) / std, atol=0.05)


@pytest.mark.parametrize("change, message", [
    ({"num_heads": 5}, r"embed_dim \(8\) must be a multiple of num_heads \(5\)"),
    ({"num_heads": 0}, "num_heads must be a positive whole number, got 0"),
    ({"patch_size": 0}, "patch_size must be a positive whole number"),
    ({"embed_dim": 0}, "embed_dim must be a positive whole number"),
    ({"patch_size": 3}, "img_size 16 is not a multiple of patch_size 3"),
    ({"mlp_ratio": -1}, "mlp_ratio must be positive"),
    ({"predictor_num_heads": 3}, r"predictor_embed_dim \(8\) must be a multiple of predictor_num_heads"),
    ({"depth": 2.0}, "depth must be a positive whole number, got 2.0")])
def test_a_config_no_network_can_be_built_from_is_refused_by_name(change, message):
    """A hand-edited model config.json used to fail inside timm (ZeroDivisionError, an assert, a negative size)."""
    settings = dict(img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2, predictor_embed_dim=8,
                    predictor_depth=1, predictor_num_heads=2)
    ijepa.IJepaConfig(**settings)
    with pytest.raises(ValueError, match=message):
        ijepa.IJepaConfig(**{**settings, **change})
