"""Sketch decoder and sampler: conditioning, persistence, compositing, reproducibility, streaming, training signal."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from decoder import (
    SketchCondition,
    SketchDecoder,
    SketchProgress,
    SketchSampler,
    box_mask_from_indices,
    initial_noise,
    scatter_tokens,
)
from ijepa.errors import WorkStopped

GRID = (4, 4)
SIZE = 16
DIM = 12
STEPS = 2


def tiny_decoder(conditioning: str = "spatial_context", seed: int = 0) -> SketchDecoder:
    torch.manual_seed(seed)
    return SketchDecoder(
        feature_dim=DIM,
        grid_size=GRID,
        image_size=SIZE,
        conditioning=conditioning,
        feature_channels=4,
        block_out_channels=(8, 16),
        attention_levels=(False, True),
        attention_head_dim=8,
        norm_num_groups=4,
    ).eval()


def box_indices(top: int, left: int, height: int, width: int) -> torch.Tensor:
    """Raster patch indices [1, K] of a rectangle of patches on the 4x4 grid."""
    return torch.tensor([[r * GRID[1] + c for r in range(top, top + height) for c in range(left, left + width)]])


def make_condition(indices: torch.Tensor, seed: int = 0) -> SketchCondition:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1
    tokens = torch.randn(indices.size(0), indices.size(1), DIM, generator=g)
    return SketchCondition.from_image(image, tokens, indices, GRID)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and OpenMP threads spinning against other processes on a
    2-core machine can make them 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def decoder() -> SketchDecoder:
    return tiny_decoder()


def test_condition_blanks_exactly_the_box():
    cond = make_condition(box_indices(1, 2, 2, 1))
    expected = torch.zeros(1, 1, SIZE, SIZE)
    expected[..., 4:12, 8:12] = 1  # patch size 4: rows 1-2, column 2
    assert torch.equal(cond.box_mask, expected)
    assert torch.all(cond.context[:, :, 4:12, 8:12] == 0)
    assert torch.count_nonzero(cond.context[:, :, :4]) > 0
    with pytest.raises(ValueError, match="patch_indices must lie"):
        box_mask_from_indices(torch.tensor([[16]]), GRID, (SIZE, SIZE))


def test_scatter_places_tokens_at_their_patches():
    tokens = torch.arange(2 * 3, dtype=torch.float32).view(1, 2, 3) + 1
    grid = scatter_tokens(tokens, torch.tensor([[5, 14]]), GRID)
    assert grid.shape == (1, 3, 4, 4)
    assert torch.equal(grid[0, :, 1, 1], tokens[0, 0]) and torch.equal(grid[0, :, 3, 2], tokens[0, 1])
    assert grid.abs().sum() == tokens.abs().sum()


@pytest.mark.parametrize("conditioning", ["spatial_context", "pooled"])
def test_forward_backward_and_input_channels(conditioning):
    model = tiny_decoder(conditioning).train()
    cond = SketchCondition.cat([make_condition(box_indices(0, 0, 2, 2)), make_condition(box_indices(1, 1, 1, 3), 1)])
    expected_in = 3 + 3 + 1 + 4 if conditioning == "spatial_context" else 3
    assert model.unet.config.in_channels == expected_in
    out = model(torch.randn(2, 3, SIZE, SIZE), torch.tensor([10, 900]), cond)
    assert out.shape == (2, 3, SIZE, SIZE)
    loss = model.training_loss(torch.rand(2, 3, SIZE, SIZE) * 2 - 1, cond, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.pooled_embedding[0].weight.grad.abs().sum() > 0


def test_only_spatial_mode_reads_the_context():
    cond = make_condition(box_indices(1, 1, 2, 2))
    other = SketchCondition(cond.tokens, cond.patch_indices, -cond.context, cond.box_mask)
    noisy = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        pooled = tiny_decoder("pooled")
        assert torch.equal(pooled(noisy, 500, cond), pooled(noisy, 500, other))
        spatial = tiny_decoder("spatial_context")
        assert not torch.allclose(spatial(noisy, 500, cond), spatial(noisy, 500, other))


def test_spatial_decoder_reads_the_box_mask(decoder):
    """The box-mask channel is how the decoder knows which pixels to draw; moving only the mask must matter."""
    cond = make_condition(box_indices(1, 1, 2, 2))
    moved = make_condition(box_indices(0, 2, 2, 2)).box_mask
    other = SketchCondition(cond.tokens, cond.patch_indices, cond.context, moved)
    noisy = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert not torch.allclose(decoder(noisy, 500, cond), decoder(noisy, 500, other), atol=1e-4)


def test_feature_map_gives_each_patch_exactly_its_own_token(decoder):
    """Shipped decoders were trained with nearest upsampling: every pixel of a patch carries that patch's token."""
    cond = make_condition(box_indices(1, 1, 2, 2))
    weight, bias = decoder.feature_proj.weight[:, :, 0, 0], decoder.feature_proj.bias
    expected = bias.expand(GRID[0] * GRID[1], -1).clone()  # empty patches: the projection of a zero token
    expected[cond.patch_indices[0]] = cond.tokens[0] @ weight.T + bias
    patch = SIZE // GRID[0]
    with torch.no_grad():
        fmap = decoder.feature_map(cond)[0]
        for r in range(GRID[0]):
            for c in range(GRID[1]):
                pixels = fmap[:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
                want = expected[r * GRID[1] + c, :, None, None].expand_as(pixels)
                torch.testing.assert_close(pixels, want, atol=1e-6, rtol=1e-5)


def test_save_pretrained_round_trip(tmp_path, decoder):
    decoder.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = SketchDecoder.from_pretrained(tmp_path).eval()
    assert loaded.config.conditioning == "spatial_context" and tuple(loaded.config.grid_size) == GRID
    saved, restored = decoder.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    # Bit-identical weights; outputs may differ in the last float bits only because safetensors-loaded
    # storage has another memory alignment, which can steer oneDNN/MKL to another kernel.
    cond = make_condition(box_indices(0, 1, 3, 2))
    noisy = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(decoder(noisy, 123, cond), loaded(noisy, 123, cond), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        SketchSampler(decoder).sample(cond, 2, STEPS), SketchSampler(loaded).sample(cond, 2, STEPS), atol=1e-5, rtol=0
    )


def test_output_outside_box_is_exactly_the_context(decoder):
    pixels = torch.randint(0, 256, (1, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(3))
    image = pixels.float() / 255 * 2 - 1
    indices = box_indices(1, 1, 2, 2)
    cond = SketchCondition.from_image(image, torch.randn(1, 4, DIM), indices, GRID)
    images = SketchSampler(decoder).sample(cond, num_samples=3, num_steps=STEPS)
    assert images.shape == (3, 3, SIZE, SIZE) and images.min() >= 0 and images.max() <= 1
    outside = ~cond.box_mask.bool().expand_as(images)
    context = ((cond.context + 1) / 2).expand_as(images)
    assert torch.equal(images[outside], context[outside])
    assert torch.equal((images * 255).round().long()[outside], pixels.expand_as(images)[outside])


def test_bf16_autocast_keeps_the_context_exact(decoder):
    cond = make_condition(box_indices(1, 1, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = SketchSampler(decoder).sample(cond, num_samples=2, num_steps=STEPS)
    assert images.dtype == torch.float32
    outside = ~cond.box_mask.bool().expand_as(images)
    assert torch.equal(images[outside], ((cond.context + 1) / 2).expand_as(images)[outside])
    reference = SketchSampler(decoder).sample(cond, num_samples=2, num_steps=STEPS)
    torch.testing.assert_close(images, reference, atol=0.1, rtol=0)


def test_seed_controls_the_sketch(decoder):
    sampler = SketchSampler(decoder)
    cond = make_condition(box_indices(0, 0, 2, 2))
    first = sampler.sample(cond, 2, STEPS, seed=7)
    assert torch.equal(first, sampler.sample(cond, 2, STEPS, seed=7))
    assert not torch.allclose(first, sampler.sample(cond, 2, STEPS, seed=8))
    assert not torch.allclose(first[0], first[1])  # samples of one condition differ only by their noise


def test_neighbouring_seeds_draw_unrelated_sketches(decoder):
    """Seed 12 is a fresh draw, not seed 11's sketches shifted by one: each (seed, sample) pair has its own noise."""
    assert not torch.equal(initial_noise(11, (1,), SIZE), initial_noise(12, (0,), SIZE))
    sampler = SketchSampler(decoder)
    cond = make_condition(box_indices(0, 0, 2, 2))
    assert not torch.allclose(sampler.sample(cond, 2, STEPS, seed=11)[1], sampler.sample(cond, 2, STEPS, seed=12)[0])


def test_seeds_that_alias_in_32_bits_draw_their_own_sketches(decoder):
    """torch's CPU generator keeps a seed's low 32 bits: seeded with seed * 1_000_003 + i, seed 251448106's samples
    2 and 3 were exactly seed 0's samples 0 and 1. Each (seed, sample) pair now has its own noise, which still does
    not depend on how many samples are drawn."""
    zero, other = initial_noise(0, (0, 1), SIZE), initial_noise(251448106, (2, 3), SIZE)
    assert not torch.equal(zero[0], other[0]) and not torch.equal(zero[1], other[1])
    assert zero.dtype == torch.float32 and zero.shape == (2, 3, SIZE, SIZE)
    assert torch.equal(initial_noise(5, (2,), SIZE)[0], initial_noise(5, (0, 1, 2), SIZE)[2])
    sampler = SketchSampler(decoder)
    cond = make_condition(box_indices(0, 0, 2, 2))
    first, aliased = sampler.sample(cond, 2, STEPS, seed=0), sampler.sample(cond, 4, STEPS, seed=251448106)[2:]
    assert not torch.allclose(first[0], aliased[0]) and not torch.allclose(first[1], aliased[1])
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        sampler.sample(cond, 1, STEPS, seed=-1)


def test_batching_boxes_and_samples_matches_separate_calls(decoder):
    sampler = SketchSampler(decoder)
    small, large = make_condition(box_indices(0, 0, 1, 2), 1), make_condition(box_indices(1, 1, 3, 3), 2)
    batched = sampler.sample(SketchCondition.cat([small, large]), num_samples=3, num_steps=STEPS, seed=5)
    separate = torch.cat([sampler.sample(c, num_samples=3, num_steps=STEPS, seed=5) for c in (small, large)])
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=0)
    alone = sampler.sample(large, num_samples=1, num_steps=STEPS, seed=5)
    torch.testing.assert_close(alone[0], separate[3], atol=1e-5, rtol=0)


def test_padding_tokens_are_ignored(decoder):
    cond = make_condition(box_indices(1, 0, 2, 2))
    padded = SketchCondition(
        tokens=torch.cat([cond.tokens, 100 * torch.randn(1, 3, DIM)], dim=1),
        patch_indices=torch.cat([cond.patch_indices, torch.tensor([[0, 4, 15]])], dim=1),
        context=cond.context,
        box_mask=cond.box_mask,
        token_mask=torch.tensor([[True] * 4 + [False] * 3]),
    )
    torch.testing.assert_close(padded.pooled_tokens(), cond.pooled_tokens())
    noisy = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(decoder(noisy, 300, padded), decoder(noisy, 300, cond))
    rebuilt = SketchCondition.from_image(cond.context, padded.tokens, padded.patch_indices, GRID, padded.token_mask)
    assert torch.equal(rebuilt.box_mask, cond.box_mask)


def test_loss_weights_favour_the_box(decoder):
    cond = make_condition(box_indices(0, 0, 2, 2))
    weights = decoder.loss_weights(cond)
    assert torch.all(weights[cond.box_mask.bool()] == 1)
    assert torch.allclose(weights[~cond.box_mask.bool()], torch.tensor(decoder.config.outside_box_loss_weight))
    assert torch.all(tiny_decoder("pooled").loss_weights(cond) == 1)


def test_overfitting_a_tiny_batch_lowers_the_loss():
    model = tiny_decoder().train()
    cond = SketchCondition.cat([make_condition(box_indices(0, 0, 2, 2), 4), make_condition(box_indices(2, 1, 2, 3), 5)])
    clean = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6)) * 2 - 1

    def eval_loss() -> float:
        generator = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(model.training_loss(clean, cond, generator).item() for _ in range(8)) / 8

    before = eval_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(120):
        optimizer.zero_grad()
        model.training_loss(clean, cond, generator).backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.65 * before, (before, after)


class OracleDecoder(SketchDecoder):
    """Returns the exact epsilon / v / x0 for one known clean image, whatever the condition."""

    clean: torch.Tensor

    def forward(self, noisy, timesteps, cond):
        alpha_bar = self.make_train_scheduler().alphas_cumprod[torch.as_tensor(timesteps).long()].view(-1, 1, 1, 1)
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        clean = self.clean.expand_as(noisy)
        noise = (noisy - alpha * clean) / sigma
        return {"epsilon": noise, "v_prediction": alpha * noise - sigma * clean,
                "sample": clean}[self.config.prediction_type]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target_and_sampler_agree_on_each_prediction_type(prediction_type):
    """A perfect denoiser has zero training loss, and the sampler turns its outputs into the clean image."""
    oracle = OracleDecoder(feature_dim=DIM, grid_size=GRID, image_size=SIZE, feature_channels=4,
                           block_out_channels=(8, 16), attention_levels=(False, True), attention_head_dim=8,
                           norm_num_groups=4, prediction_type=prediction_type).eval()
    oracle.clean = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9)) * 1.6 - 0.8
    cond = make_condition(box_indices(1, 1, 2, 2))
    loss = oracle.training_loss(oracle.clean, cond, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8
    sketch = SketchSampler(oracle).sample(cond, num_samples=1, num_steps=6, seed=1)
    inside = cond.box_mask.bool().expand_as(sketch)
    torch.testing.assert_close(sketch[inside], ((oracle.clean + 1) / 2)[inside], atol=2e-3, rtol=0)


def test_stream_yields_first_sketch_early_and_ends_like_sample(decoder):
    sampler = SketchSampler(decoder)
    cond = SketchCondition.cat([make_condition(box_indices(0, 0, 2, 2)), make_condition(box_indices(1, 2, 2, 2), 1)])
    events = list(sampler.stream(cond, num_samples=3, num_steps=4, seed=2))
    assert all(isinstance(e, SketchProgress) for e in events)
    assert [(e.sample_indices, e.done) for e in events] == [((0,), False), ((0, 1, 2), True)]
    final = events[-1].images
    torch.testing.assert_close(final, sampler.sample(cond, num_samples=3, num_steps=4, seed=2), atol=1e-5, rtol=0)
    torch.testing.assert_close(events[0].images, final[0::3], atol=1e-5, rtol=0)  # first sketch of each box
    single = list(sampler.stream(cond, num_samples=1, num_steps=STEPS))
    assert len(single) == 1 and single[0].done


def test_should_stop_ends_sampling_between_steps(decoder):
    """The app stops a run whose page shows another image: the sampler must give the device up at the next solver
    step (an 8 x 30 batch held the next image's work for ~4.6 s when the run could only stop between updates), and
    a should_stop that never fires must not change a sketch."""
    cond = make_condition(box_indices(0, 0, 2, 2))
    sampler = SketchSampler(decoder)
    torch.testing.assert_close(sampler.sample(cond, 2, 4, seed=3, should_stop=lambda: False),
                               sampler.sample(cond, 2, 4, seed=3), atol=0, rtol=0)
    calls, asked = [], []
    handle = decoder.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        with pytest.raises(WorkStopped):
            sampler.sample(cond, 2, 6, seed=3, should_stop=lambda: asked.append(1) or len(asked) > 2)
        assert len(calls) == 2  # the two steps before it said stop, none after
        calls.clear()
        events = sampler.stream(cond, num_samples=3, num_steps=4, seed=3, should_stop=lambda: len(calls) >= 5)
        assert next(events).sample_indices == (0,)  # the first sketch finished: 4 steps
        with pytest.raises(WorkStopped):
            next(events)
        assert len(calls) == 5  # one step of the batch of the other two
    finally:
        handle.remove()


def test_invalid_arguments_raise(decoder):
    cond = make_condition(box_indices(0, 0, 1, 1))
    with pytest.raises(ValueError, match="prediction_type"):
        SketchSampler(decoder, DPMSolverMultistepScheduler(prediction_type="epsilon"))
    with pytest.raises(ValueError, match="beta_schedule"):
        cosine = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample")
        SketchSampler(decoder, cosine)
    with pytest.raises(ValueError, match="beta_end"):  # another linear schedule is still another schedule
        SketchSampler(decoder, DPMSolverMultistepScheduler(beta_end=0.012, prediction_type="sample"))
    with pytest.raises(ValueError, match="cond.repeat"):
        decoder(torch.randn(2, 3, SIZE, SIZE), 1, cond)
    with pytest.raises(ValueError, match="first"):
        next(SketchSampler(decoder).stream(cond, num_samples=2, first=3))
    with pytest.raises(ValueError, match="conditioning"):
        SketchDecoder(conditioning="cross_attention")
    with pytest.raises(ValueError, match=r"multiple of norm_num_groups \(32.*\(8, 16, 32\)"):  # not torch's GroupNorm
        SketchDecoder(block_out_channels=(8, 16, 32))


@pytest.mark.parametrize("scheduler_class", [DPMSolverMultistepScheduler, DDIMScheduler])
def test_a_scheduler_with_other_noise_levels_is_refused(decoder, scheduler_class):
    """Settings beyond the betas change the noise levels too: zero-terminal-SNR rescaling shifts alphas_cumprod by
    up to 0.003 with the same betas, so the decoder would be asked about noise levels it never saw."""
    with pytest.raises(ValueError, match=r"noise levels \(alphas_cumprod\).*rescale_betas_zero_snr=True"):
        SketchSampler(decoder, scheduler_class(prediction_type="sample", rescale_betas_zero_snr=True))
    SketchSampler(decoder, scheduler_class(prediction_type="sample"))  # the training schedule: accepted


def test_default_config_fits_the_cpu_budget():
    model = SketchDecoder()
    assert model.config.image_size == 64 and tuple(model.config.grid_size) == (16, 16)
    assert model.unet.config.in_channels == 3 + 3 + 1 + 16
    assert [type(b).__name__ for b in model.unet.down_blocks] == ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"]
    assert model.config.prediction_type == "sample"  # what train.decoder trains (bench/RESULTS.md)
    assert sum(p.numel() for p in model.parameters()) < 4_000_000


def test_sketches_read_the_predicted_tokens_pooled_mode_only_their_mean():
    """Both modes depend on the box's tokens; the paper's mode sees only their average (a permutation of the
    box's tokens changes nothing), ours also where each token sits (the same permutation changes the output)."""
    cond = make_condition(box_indices(1, 1, 2, 2))
    other = SketchCondition(torch.randn_like(cond.tokens), cond.patch_indices, cond.context, cond.box_mask)
    permuted = SketchCondition(cond.tokens[:, [3, 2, 1, 0]], cond.patch_indices, cond.context, cond.box_mask)
    noisy = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        for conditioning in ("spatial_context", "pooled"):
            decoder = tiny_decoder(conditioning)
            base = decoder(noisy, 500, cond)
            assert not torch.allclose(base, decoder(noisy, 500, other), atol=1e-4), conditioning
            if conditioning == "pooled":
                torch.testing.assert_close(decoder(noisy, 500, permuted), base, rtol=1e-5, atol=1e-6)
            else:
                assert not torch.allclose(decoder(noisy, 500, permuted), base, atol=1e-4)


def test_sample_runs_the_model_once_per_requested_step(decoder):
    """The app's Steps slider sets num_steps: every step must reach the model, none silently dropped. Samples and
    boxes are batched into one model call per step, so 2 boxes x 3 samples still cost exactly num_steps calls."""
    timesteps = []
    handle = decoder.register_forward_hook(lambda module, args, output: timesteps.append(int(args[1])))
    try:
        cond = SketchCondition.cat([make_condition(box_indices(0, 0, 2, 2)), make_condition(box_indices(1, 1, 2, 2))])
        SketchSampler(decoder).sample(cond, num_samples=3, num_steps=5)
    finally:
        handle.remove()
    assert len(timesteps) == 5 and len(set(timesteps)) == 5, timesteps


def test_default_scheduler_keeps_its_documented_solver_settings(decoder):
    """The default sampler's accuracy at few steps rests on DPM-Solver++ (2M), log-SNR-uniform steps and x0
    clipped to [-1, 1], as make_default_scheduler documents; a silent change would degrade every sketch."""
    config = SketchSampler(decoder).scheduler.config
    assert config.algorithm_type == "dpmsolver++" and config.solver_order == 2
    assert config.use_lu_lambdas is True
    assert config.thresholding is True and config.sample_max_value == 1.0
