"""Multi-block mask sampling and the mask collator (ijepa/masks.py)."""
import pickle
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ijepa.masks import MaskCollator, MaskConfig, MultiBlockMaskGenerator, apply_masks

# Sampling takes milliseconds; a generous deadline still catches a sampler that spins.
SAMPLING = settings(max_examples=60, deadline=2000)

grid_sides = st.integers(min_value=8, max_value=32)


def _sample(grid, config=None, batch_size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return MultiBlockMaskGenerator(grid, config)(batch_size, generator)


def _rows_cols(indices, grid_w):
    return indices // grid_w, indices % grid_w


def _block_aspect(indices, grid_w) -> float:
    """Height over width of the rectangle a block's patch indices span."""
    rows, cols = _rows_cols(indices, grid_w)
    return (int(rows.max() - rows.min()) + 1) / (int(cols.max() - cols.min()) + 1)


def _assert_valid_index_mask(mask, batch_size, num_patches):
    assert mask.dtype == torch.long and mask.dim() == 2 and mask.shape[0] == batch_size
    assert mask.shape[1] >= 1
    assert int(mask.min()) >= 0 and int(mask.max()) < num_patches
    assert bool((mask[:, 1:] > mask[:, :-1]).all()), "indices must be unique and sorted"


# ---------------------------------------------------------------------------------------------------------------------
# Multi-block sampling
# ---------------------------------------------------------------------------------------------------------------------

@SAMPLING
@given(gh=grid_sides, gw=grid_sides, batch_size=st.integers(1, 12), seed=st.integers(0, 2**31),
       quirks=st.booleans())
def test_sampled_masks_are_valid(gh, gw, batch_size, seed, quirks):
    config = MaskConfig(official_quirks=quirks)
    context_masks, target_masks = _sample((gh, gw), config, batch_size, seed)
    n = gh * gw
    assert len(context_masks) == 1 and len(target_masks) == config.num_targets
    context = context_masks[0]
    _assert_valid_index_mask(context, batch_size, n)
    assert context.shape[1] > config.min_keep
    assert context.shape[1] <= n * config.context_scale[1]
    assert len({t.shape for t in target_masks}) == 1, "all target masks must have one length so they stack"
    for target in target_masks:
        _assert_valid_index_mask(target, batch_size, n)
        for b in range(batch_size):
            assert not set(target[b].tolist()) & set(context[b].tolist()), "targets must be removed from the context"


@SAMPLING
@given(gh=grid_sides, gw=grid_sides, seed=st.integers(0, 2**31))
def test_targets_are_solid_blocks_in_the_configured_ranges(gh, gw, seed):
    config = MaskConfig()
    _, target_masks = _sample((gh, gw), config, batch_size=3, seed=seed)
    for target in target_masks:
        scale = target.shape[1] / (gh * gw)
        assert config.target_scale[0] <= scale <= config.target_scale[1]
        for indices in target:
            rows, cols = _rows_cols(indices, gw)
            height = int(rows.max() - rows.min()) + 1
            width = int(cols.max() - cols.min()) + 1
            assert height * width == indices.numel(), "default mode keeps whole rectangles (no truncation)"
            assert config.target_aspect[0] <= height / width <= config.target_aspect[1]


@SAMPLING
@given(side=grid_sides, seed=st.integers(0, 2**31))
def test_context_block_scale_in_range_when_overlap_allowed(side, seed):
    config = MaskConfig(allow_overlap=True)
    context_masks, _ = _sample(side, config, batch_size=2, seed=seed)
    scale = context_masks[0].shape[1] / side**2
    assert config.context_scale[0] <= scale <= config.context_scale[1]


@SAMPLING
@given(gh=grid_sides, gw=grid_sides, seed=st.integers(0, 2**31))
def test_official_quirks_never_touch_last_row_or_column(gh, gw, seed):
    context_masks, target_masks = _sample((gh, gw), MaskConfig(official_quirks=True), batch_size=8, seed=seed)
    for mask in context_masks + target_masks:
        rows, cols = _rows_cols(mask, gw)
        assert int(rows.max()) < gh - 1 and int(cols.max()) < gw - 1


def test_default_blocks_reach_last_row_and_column():
    gh, gw = 8, 10
    generator = torch.Generator().manual_seed(0)
    sampler = MultiBlockMaskGenerator((gh, gw))
    touched_row = touched_col = False
    for _ in range(50):
        _, target_masks = sampler(8, generator)
        rows, cols = _rows_cols(torch.stack(target_masks), gw)
        touched_row |= bool((rows == gh - 1).any())
        touched_col |= bool((cols == gw - 1).any())
    assert touched_row and touched_col


@pytest.mark.parametrize("quirks", [False, True])
def test_equal_length_truncation(quirks):
    """Quirks keep a raster-order prefix of each context; the default keeps a random subset."""
    grid, batch_size, seed = 16, 32, 3
    sampler = MultiBlockMaskGenerator(grid, MaskConfig(official_quirks=quirks))
    context_map, _ = sampler.sample_maps(batch_size, torch.Generator().manual_seed(seed))
    context_masks, _ = sampler(batch_size, torch.Generator().manual_seed(seed))
    context = context_masks[0]
    length = context.shape[1]
    counts = context_map.sum(-1)
    assert length == int(counts.min()) and bool((counts > length).any())
    prefixes = [torch.nonzero(row).flatten()[:length] for row in context_map]
    is_prefix = [torch.equal(kept, prefix) for kept, prefix in zip(context, prefixes)]
    for row, kept in zip(context_map, context):
        assert bool(row[kept].all()), "kept indices must come from the sampled context"
    if quirks:
        assert all(is_prefix)
    else:
        assert sum(is_prefix) < batch_size // 2


def test_sampling_is_deterministic_by_seed():
    first = _sample(16, batch_size=8, seed=7)
    again = _sample(16, batch_size=8, seed=7)
    other = _sample(16, batch_size=8, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first[0] + first[1], again[0] + again[1]))
    assert not all(torch.equal(a, b) for a, b in zip(first[1], other[1]))


@pytest.mark.parametrize("side", [16, 32])
def test_mean_target_scale_over_many_draws(side):
    sampler = MultiBlockMaskGenerator(side)
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([sampler(1, generator)[1][0].shape[1] / side**2 for _ in range(400)])
    assert 0.15 < float(scales.mean()) < 0.2
    assert abs(float(scales.mean()) - 0.175) < 0.01, "sizes should spread over the range, not hug one end"
    assert float(scales.std()) > 0.01


def test_target_aspect_is_drawn_uniformly_as_in_the_official_code():
    """Aspect ratios are uniform in 0.75-1.5 (mean 1.125), as the official sampler draws them; a log-uniform draw
    (mean 1.082) would make target blocks wider on average."""
    side = 64  # fine enough that rounding to whole patches moves the mean by little
    sampler = MultiBlockMaskGenerator(side)
    generator = torch.Generator().manual_seed(0)
    aspects = [_block_aspect(sampler(1, generator)[1][0][0], side) for _ in range(1200)]
    assert abs(sum(aspects) / len(aspects) - 1.125) < 0.02  # three standard errors of 1200 draws


def _scale_aspect_correlation(config, draws=400):
    side = 32
    sampler = MultiBlockMaskGenerator(side, config)
    generator = torch.Generator().manual_seed(0)
    scales, aspects = [], []
    for _ in range(draws):
        target = sampler(1, generator)[1][0][0]
        scales.append(target.numel())
        aspects.append(_block_aspect(target, side))
    return float(torch.corrcoef(torch.tensor([scales, aspects], dtype=torch.float64))[0, 1])


def test_scale_and_aspect_are_independent_unless_quirks():
    assert abs(_scale_aspect_correlation(MaskConfig())) < 0.2
    assert _scale_aspect_correlation(MaskConfig(official_quirks=True)) > 0.8


def test_crowded_context_falls_back_without_spinning():
    """A small context block is often covered by the targets: bounded fallbacks must still give valid masks."""
    config = MaskConfig(context_scale=(0.3, 0.35), context_aspect=(0.75, 1.5))
    start = time.perf_counter()
    context_masks, target_masks = _sample(8, config, batch_size=256, seed=0)
    assert time.perf_counter() - start < 2.0
    context = context_masks[0]
    assert context.shape[1] > config.min_keep
    for target in target_masks:
        for b in range(256):
            assert not set(target[b].tolist()) & set(context[b].tolist())


def test_large_batch_on_large_grid_is_fast():
    sampler = MultiBlockMaskGenerator(32)
    generator = torch.Generator().manual_seed(0)
    sampler(256, generator)
    start = time.perf_counter()
    context_masks, target_masks = sampler(256, generator)
    assert time.perf_counter() - start < 1.0
    assert torch.stack(target_masks).shape[:2] == (4, 256)


def test_allow_overlap_keeps_whole_context_block():
    config = MaskConfig(allow_overlap=True)
    context_masks, target_masks = _sample(16, config, batch_size=64, seed=1)
    context = context_masks[0]
    overlaps = sum(bool(set(t[b].tolist()) & set(context[b].tolist())) for t in target_masks for b in range(64))
    assert overlaps > 0


def test_masks_gather_tokens_with_apply_masks():
    context_masks, target_masks = _sample(8, batch_size=2, seed=0)
    tokens = torch.arange(2 * 64, dtype=torch.float32).view(2, 64, 1)
    gathered = apply_masks(tokens, target_masks)
    assert gathered.shape == (4 * 2, target_masks[0].shape[1], 1)
    assert torch.equal(gathered[1, :, 0], tokens[1, target_masks[0][1], 0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_scale=(0.9, 1.0)), "min_keep"),
    (dict(target_scale=(0.2, 0.1)), "target_scale"),
    (dict(num_targets=0), "num_targets"),
    (dict(allow_overlap=True, context_scale=(0.1, 0.1)), "context block"),
])
def test_invalid_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiBlockMaskGenerator(8, MaskConfig(**kwargs))


def test_rejects_empty_batch():
    with pytest.raises(ValueError, match="batch_size"):
        MultiBlockMaskGenerator(8)(0, torch.Generator())


# ---------------------------------------------------------------------------------------------------------------------
# MaskCollator
# ---------------------------------------------------------------------------------------------------------------------

def _items(indices, size=32):
    return [{"image": torch.rand(3, size, size), "index": i, "label": torch.tensor(i % 3), "path": f"img{i}.jpg"}
            for i in indices]


def test_collator_stacks_batch_and_masks():
    collate = MaskCollator(grid_size=4, config=MaskConfig(min_keep=2), seed=0)
    items = _items([5, 9, 2])
    batch = collate(items)
    assert batch["images"].shape == (3, 3, 32, 32)
    assert torch.equal(batch["images"][1], items[1]["image"])
    assert batch["indices"].tolist() == [5, 9, 2] and batch["indices"].dtype == torch.long
    assert batch["label"].tolist() == [2, 0, 2]
    assert "path" not in batch
    assert len(batch["context_masks"]) == 1 and batch["context_masks"][0].shape[0] == 3
    assert len(batch["target_masks"]) == 4


def test_collator_masks_depend_only_on_seed_and_batch():
    collate = MaskCollator(grid_size=16, seed=1)
    first, second = _items([10, 11]), _items([40, 41])
    a1, b1 = collate(first), collate(second)
    b2, a2 = collate(second), collate(first)  # other call order, as with several workers or after a resume
    restored = pickle.loads(pickle.dumps(collate))  # what a worker process receives
    a3 = restored(first)
    for key in ("context_masks", "target_masks"):
        assert all(torch.equal(x, y) for x, y in zip(a1[key], a2[key]))
        assert all(torch.equal(x, y) for x, y in zip(a1[key], a3[key]))
        assert all(torch.equal(x, y) for x, y in zip(b1[key], b2[key]))
    assert not all(torch.equal(x, y) for x, y in zip(a1["target_masks"], b1["target_masks"]))
    other_seed = MaskCollator(grid_size=16, seed=2)(first)
    assert not all(torch.equal(x, y) for x, y in zip(a1["target_masks"], other_seed["target_masks"]))


def test_collator_works_as_dataloader_collate_fn():
    dataset = _items(range(6))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=MaskCollator(16, seed=0))
    batches = list(loader)
    assert [b["indices"].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5]]


def test_collator_rejects_bad_items():
    collate = MaskCollator(16)
    with pytest.raises(ValueError, match="empty"):
        collate([])
    with pytest.raises(ValueError, match="'index'"):
        collate([{"image": torch.rand(3, 8, 8)}])
    with pytest.raises(ValueError, match="clashes"):
        collate([{"image": torch.rand(3, 8, 8), "index": 0, "images": torch.zeros(1)}])
