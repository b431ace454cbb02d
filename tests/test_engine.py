"""The app's engine and the inference functions behind its panels, on a tiny random bundle.

What a user relies on: any common image file becomes the model's square view with boxes mapped onto it; bad
files and boxes fail with a message that says what to change; sketches stream (first one early), keep the
context pixel-exact and are reproducible from the seed; the surprise map and PCA have the grid's shape and
are computed correctly; missing bundle parts switch panels off with an explanation instead of failing.
"""
from __future__ import annotations

import dataclasses

import io
import json
import shutil
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from decoder.model import box_mask_from_indices
from ijepa.bundle import build_random_bundle, load_examples, load_probe, train_decoder_hint
from ijepa.checkpoint import load_model, save_model
from ijepa import figures, panels
import ijepa.engine as engine_module
from ijepa.engine import Engine, InputError
from ijepa.errors import WorkStopped
from ijepa.figures import (BOX_COLORS, HIDDEN_GREY, patch_bounds, render_surprise, render_truth_vs_prediction,
                           sketch_sheet, upscale)
from ijepa.boxes import MAX_BOXES, boxes_to_masks, map_boxes
from ijepa.inference import (MAX_IMAGE_PIXELS, LinearReadout, analyze_boxes, feature_pca, nearest_neighbours,
                             open_image, prepare_image, surprise_map, to_rgb, window_positions)
from ijepa.model import IJepaConfig
from train.decoder import box_conditions

SIZE, PATCH = 32, 4
GRID = SIZE // PATCH
TINY_DECODER = dict(feature_channels=4, block_out_channels=(8, 16), attention_levels=(False, True),
                    attention_head_dim=8, norm_num_groups=4)
STEPS = 2


def tiny_config() -> IJepaConfig:
    return IJepaConfig.from_arch("vit_tiny", img_size=SIZE, patch_size=PATCH, depth=1, predictor_depth=1,
                                 predictor_embed_dim=48)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_random_bundle(tmp_path_factory.mktemp("bundle"), tiny_config(), TINY_DECODER)


@pytest.fixture(scope="module")
def engine(bundle):
    torch.set_num_threads(2)
    return Engine.load(bundle, device="cpu")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and that holds no pixel data (a decompression-bomb stand-in)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


# ----- images: every mode and format becomes upright 8-bit RGB ------------------------------------------------

RED, BLUE = (255, 0, 0), (0, 0, 255)


def halves(mode_image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour of the left and right halves of a converted image."""
    rgb = np.asarray(to_rgb(mode_image), dtype=np.float64)
    width = rgb.shape[1]
    return rgb[:, : width // 2].mean(axis=(0, 1)), rgb[:, width // 2:].mean(axis=(0, 1))



def test_a_model_with_a_coarse_grid_warms_up(tmp_path):
    """Warming up drew a box a quarter of the image wide: inside one patch of a 3 x 3 grid, which the model refuses."""
    config = IJepaConfig.from_arch("vit_tiny", img_size=12, patch_size=4, depth=1, predictor_depth=1,
                                   predictor_embed_dim=48)
    engine = Engine.load(build_random_bundle(tmp_path / "b", config, None), device="cpu")
    engine.warm_up()

def test_rgba_transparency_becomes_white_and_opaque_colour_is_kept():
    image = Image.new("RGBA", (8, 4), (0, 0, 0, 0))
    image.paste((*RED, 255), (4, 0, 8, 4))
    left, right = halves(image)
    np.testing.assert_allclose(left, 255)
    np.testing.assert_allclose(right, RED)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "LA", "YCbCr", "LAB"])
def test_other_modes_convert_to_rgb(mode):
    source = Image.new("RGB", (8, 4), (255, 255, 255))
    source.paste(RED if mode not in ("L", "1", "LA") else (0, 0, 0), (4, 0, 8, 4))
    converted = to_rgb(source.convert(mode))
    assert converted.mode == "RGB" and converted.size == (8, 4)
    left, right = halves(source.convert(mode))
    assert np.abs(left - 255).max() <= 3, mode  # white stays white
    assert np.abs(left - right).max() > 100, mode  # the other half stays distinct


def test_palette_with_transparency_is_composited():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (2, 0, 4, 4))
    image.info["transparency"] = 0
    left, right = halves(image)
    np.testing.assert_allclose(left, 255)
    np.testing.assert_allclose(right, RED)


def test_16_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16).repeat(2, axis=0)
    loaded = open_image(encode(Image.fromarray(values, mode="I;16"), "PNG"))
    assert loaded.mode.startswith("I")  # Pillow keeps 16 bits; to_rgb must scale them
    rgb = np.asarray(to_rgb(loaded))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 64, 128, 255])


def test_32_bit_and_float_greyscale():
    ints = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I")
    np.testing.assert_array_equal(np.asarray(to_rgb(ints))[0, :, 1], [0, 255])
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    np.testing.assert_array_equal(np.asarray(to_rgb(floats))[0, :, 2], [0, 128, 255])


def test_float_arrays_are_read_in_0_to_1_and_0_to_255_is_refused():
    """A float array of 0-255 values (an image cast with astype(float)) would clip to white: say how to pass it."""
    pixels = np.random.default_rng(0).integers(0, 256, (6, 6, 3)).astype(np.uint8)
    pixels[0, 0] = 255
    np.testing.assert_array_equal(np.asarray(to_rgb(pixels / 255.0)), pixels)
    with pytest.raises(InputError, match=r"values in \[0, 1\], got up to 255: divide it by 255 or pass uint8"):
        to_rgb(pixels.astype(np.float32))
    nan_image = np.full((4, 4), np.nan, np.float32)
    assert np.asarray(to_rgb(nan_image)).max() == 0  # NaN reads as 0, as before


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_common_formats_open(fmt):
    image = Image.new("RGB", (40, 30), RED)
    loaded = to_rgb(open_image(encode(image, fmt)))
    assert loaded.size == (40, 30)
    assert np.abs(np.asarray(loaded, dtype=int)[15, 20] - RED).max() <= 8


def test_exif_rotation_is_applied_like_a_browser():
    # Stored 40x20 with red on the left; orientation 6 means "rotate 90 degrees clockwise to display".
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))
    exif = stored.getexif()
    exif[0x0112] = 6
    upright = to_rgb(open_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95)))
    assert upright.size == (20, 40)
    pixels = np.asarray(upright, dtype=int)
    assert np.abs(pixels[5, 10] - RED).max() < 40 and np.abs(pixels[35, 10] - BLUE).max() < 40
    prepared = prepare_image(upright, SIZE)
    assert prepared.source_size == (20, 40) and prepared.crop == (0.0, 10.0, 20.0)


def test_prepare_crops_the_centre_square_and_maps_boxes():
    image = Image.new("RGB", (320, 240), (0, 255, 0))
    image.paste(RED, (40, 0, 280, 240))  # exactly the centre square
    prepared = prepare_image(image, SIZE)
    assert prepared.pixels.shape == (3, SIZE, SIZE) and prepared.pixels.dtype == torch.float32
    assert torch.allclose(prepared.pixels[:, SIZE // 2, SIZE // 2], torch.tensor([1.0, 0.0, 0.0]))
    assert (prepared.to_uint8()[..., 1] < 20).all()  # no green from outside the square leaks in
    assert prepared.crop == (40.0, 0.0, 240.0)
    assert prepared.to_model((40, 0, 280, 240)) == pytest.approx((0, 0, SIZE, SIZE))
    assert prepared.to_model((100, 60, 160, 120)) == pytest.approx((8, 8, 16, 16))
    assert prepared.to_source(prepared.to_model((101, 7, 203, 99))) == pytest.approx((101, 7, 203, 99))
    assert map_boxes(prepared, [[100, 60, 160, 120], {"xmin": 30, "ymin": 0, "xmax": 70, "ymax": 30}], PATCH) == [
        pytest.approx((8, 8, 16, 16)), pytest.approx((0, 0, 4, 4))]


# ----- bad input: InputError with a message that says what to do ----------------------------------------------

@pytest.mark.parametrize("data, message", [
    (b"this is not an image", "not an image"),
    (encode(Image.new("RGB", (64, 64), RED), "PNG")[:60], "damaged"),
    (png_header_only(100_000, 100_000), "megapixels"),
    (png_header_only(9_000, 8_000), "limit"),
])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns first; we then refuse
def test_bad_files_are_refused_with_clear_messages(data, message):
    with pytest.raises(InputError, match=message):
        open_image(data)


def test_an_image_over_the_limit_is_refused_in_our_words_only(monkeypatch):
    """app.py lowers Pillow's limit to ours, and Pillow then warns of 50-100 megapixel files before our refusal:
    a server log entry for every such upload."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match="72 megapixels"):
            open_image(png_header_only(9_000, 8_000))


@pytest.mark.parametrize("boxes, message", [
    ([], "No box was given"),
    ([[0, 0, 40, 40]] * 5, "at most 4"),
    ([[10, 10, 13, 40]], r"smaller than one patch.*one grid cell.*30 pixels of the image file"),
    ([[0, 0, 240, 240]], "no context"),
    ([[-50, 10, -5, 100]], "outside the 240x240 image"),
    ([[10, 300, 100, 400]], "outside the 240x240 image"),
    ("[[10, 10, 100, 100]]", "parse JSON first"),
    ([[50, 50, 20, 80]], "empty"),
    ([[float("nan"), 1, 2, 3]], "finite"),
    ([[1, 2, 3]], r"\[xmin, ymin, xmax, ymax\]"),
    ([["a", 1, 2, 3]], "four numbers"),
    ([{"xmin": 1, "ymin": 2}], "missing"),
    ([120, 80, 200, 160], r"a list of boxes, e.g. \[\[xmin.*one flat list of 4 numbers"),  # the outer list left out
    ([120, 80, 200, 160, 5], "one flat list of 5 numbers"),  # not "5 boxes were given"
    (np.array([10, 20, 90, 100]), "one flat list of 4 numbers"),
])
def test_bad_boxes_are_refused_with_clear_messages(engine, boxes, message):
    image = np.zeros((240, 240, 3), np.uint8)
    with pytest.raises(InputError, match=message):
        engine.analyze(image, boxes)


def test_boxes_may_come_as_arrays(engine):
    image = np.zeros((240, 240, 3), np.uint8)
    as_list = engine.analyze(image, [[32, 64, 160, 128]]).result.boxes[0].target_indices
    for boxes in (np.array([[32, 64, 160, 128]]), [np.array([32, 64, 160, 128])], torch.tensor([[32, 64, 160, 128]])):
        assert torch.equal(engine.analyze(image, boxes).result.boxes[0].target_indices, as_list)


def test_box_outside_the_centre_square_is_explained(engine):
    with pytest.raises(InputError, match=r"centre square.*x 40\.\.280"):
        engine.analyze(np.zeros((240, 320, 3), np.uint8), [[0, 0, 30, 100]])
    # a box big enough, with less than a patch of it inside the square: not called too small
    with pytest.raises(InputError, match=r"Only a sliver of box 1.*x 40\.\.280.*Move the box"):
        engine.analyze(np.zeros((240, 320, 3), np.uint8), [[0, 0, 60, 100]])


def test_a_box_larger_than_the_decoder_learnt_to_fill_is_flagged(engine):
    """Decoder training draws boxes up to half the grid's side; the app accepts larger ones, and says so."""
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    half, patch = GRID // 2, SIZE // GRID
    fits = engine.analyze(image, [[0, 0, half * patch, half * patch]])
    wide = engine.analyze(image, [[0, 0, (half + 1) * patch, patch]])
    decoder = engine.conditioning_of(None)
    assert "trained to fill" not in panels.explanation(fits, decoder)
    assert f"trained to fill, {half}x{half} patches at most" in panels.explanation(wide, decoder)


def test_a_box_running_past_the_edge_keeps_its_inside_part_and_says_so(engine):
    """Boxes from programs often overshoot an edge, and boxes drawn on a wide image the side strips: the part the
    model sees is hidden, and the report, the metrics and the explanation say it was cut."""
    image = np.zeros((240, 320, 3), np.uint8)
    analysis = engine.analyze(image, [[0, 100, 100, 300], [120, 40, 200, 120]])
    cut, whole = analysis.reports
    assert cut.clipped and not whole.clipped
    assert cut.box_model == pytest.approx((0.0, 100 * SIZE / 240, 60 * SIZE / 240, float(SIZE)))
    assert [b["clipped"] for b in analysis.metrics()["boxes"]] == [True, False]
    text = panels.explanation(analysis, engine.conditioning_of(None))
    assert text.count("only its part inside the centre square") == 1


# ----- the computations behind the panels ---------------------------------------------------------------------

def test_analyze_reports_every_box(engine):
    image = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    analysis = engine.analyze(image, [[40, 0, 100, 60], [160, 120, 280, 240]])
    assert [r.patches for r in analysis.reports] == [4, 16]
    assert analysis.result.context_indices.numel() == GRID * GRID - 20
    for report, box in zip(analysis.reports, analysis.result.boxes):
        assert len(report.error_per_patch) == report.patches and report.error == pytest.approx(box.error)
        assert len(report.probe["subgroup"]) == 5 and len(report.neighbours) == 6
        assert sum(p for _, p in report.probe["subgroup"]) <= 1.0 + 1e-6
    metrics = json.loads(json.dumps(analysis.metrics()))
    assert metrics["boxes"][1]["box"] == [160, 120, 280, 240] and metrics["boxes"][1]["hidden_patches"] == 16
    view = panels.model_view(analysis)
    assert view.shape == (SIZE * panels.display_scale(SIZE),) * 2 + (3,) and view.dtype == np.uint8


@pytest.fixture(scope="module")
def clipped_and_whole(engine):
    """Two boxes on a wide image: box 1 (4 patches, top left) runs past the centre square, box 2 (16 patches) not."""
    image = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    return engine.analyze(image, [[0, 0, 100, 60], [160, 120, 280, 240]])


def test_the_model_view_fills_each_box_in_its_own_colour(clipped_and_whole):
    """The model view's box colours must match the widget's, so a user can tell which hidden cells are box 2's."""
    scale = panels.display_scale(SIZE)
    view = panels.model_view(clipped_and_whole)
    for b, box in enumerate(clipped_and_whole.result.boxes):
        r, c = divmod(int(box.target_indices[-1]), GRID)  # its last cell: away from the number at its corner
        y, x = ((r + 0.5) * PATCH * scale, (c + 0.5) * PATCH * scale)
        assert tuple(view[int(y), int(x)]) == BOX_COLORS[b], b


def test_the_model_view_numbers_each_box_at_its_own_corner(clipped_and_whole, monkeypatch):
    """The results say "Box 1", "Box 2": the model view must write each number on the box it names."""
    drawn = []
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k: drawn.append((xy, text)))
    panels.model_view(clipped_and_whole)
    scale = panels.display_scale(SIZE)
    corners = [(r.box_model[0] * scale + 4, r.box_model[1] * scale + 2) for r in clipped_and_whole.reports]
    assert sorted(drawn, key=lambda d: d[1]) == [(pytest.approx(corners[0]), "1"), (pytest.approx(corners[1]), "2")]


def test_the_explanation_counts_the_patches_the_model_saw(clipped_and_whole):
    """The explanation's patch counts tell a user how much context the model had."""
    text = panels.explanation(clipped_and_whole, None)
    hidden = "The 20 patches under your boxes were hidden (covered in the picture)"
    assert f"{hidden}; it saw the other {GRID * GRID - 20}." in text


def test_the_clipping_note_is_on_the_clipped_box_only(clipped_and_whole):
    """A user reads the clipping note beside the box that was cut, not beside another one."""
    assert [r.clipped for r in clipped_and_whole.reports] == [True, False]
    lines = panels.explanation(clipped_and_whole, None).split("\n\n")
    (first,) = [line for line in lines if line.startswith("- Box 1:")]
    (second,) = [line for line in lines if line.startswith("- Box 2:")]
    assert "only its part inside the centre square" in first and "centre square" not in second


def test_the_readout_shows_the_probe_on_the_true_features_in_its_truth_row(clipped_and_whole):
    """The truth row lets a user check the probe against the real features; it must not repeat the guess."""
    report = clipped_and_whole.reports[0]
    label = report.probe["subgroup"][1][0]  # a label other than the guess's top one
    truth = {**report.probe_on_truth, "subgroup": [(label, 0.42)]}
    analysis = dataclasses.replace(clipped_and_whole, reports=[dataclasses.replace(report, probe_on_truth=truth)])
    (row,) = [r for r in panels.readout_markdown(analysis).split("\n\n") if r.startswith("**Box 1, subgroup:**")]
    assert row.endswith(f"<small>on the true features: {label} (42%)</small>")


def test_analyze_errors_are_mse_to_layer_normed_truth(engine):
    prepared = prepare_image(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8), SIZE)
    context, targets = boxes_to_masks([(8, 8, 16, 16)], (SIZE, SIZE), GRID)
    result = analyze_boxes(engine.model, prepared.pixels, context, targets)
    box = result.boxes[0]
    expected = torch.nn.functional.layer_norm(engine.model.target_encoder(
        engine.model.normalize(prepared.pixels[None]))[0], (192,))[box.target_indices]
    torch.testing.assert_close(box.true, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(box.errors, (box.predicted - box.true).pow(2).mean(-1))


@pytest.fixture(scope="module")
def trained_like_engine(bundle):
    """An engine whose target encoder differs from its context encoder, as after any training (in the random
    bundle they are copies), and whose bank shares a large common direction, as real box features do."""
    engine = Engine.load(bundle, device="cpu")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in engine.model.target_encoder.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=generator))
    bank = engine.bank
    shared = bank.features + 4.0 * torch.randn(bank.features.size(1), generator=generator)
    engine.bank = dataclasses.replace(bank, features=shared)  # its centre is recomputed from the new features
    return engine


def test_predictions_read_the_context_encoder_and_the_truth_reads_the_target_encoder(trained_like_engine):
    """The panels compare the predictor (from the context encoder's view) with the target encoder's truth."""
    model = trained_like_engine.model
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(8))
    context, targets = boxes_to_masks([(8, 8, 20, 16)], (SIZE, SIZE), GRID)
    box = analyze_boxes(model, image, context, targets).boxes[0]
    pixels = model.normalize(image[None])
    with torch.no_grad():
        ctx = context.unsqueeze(0)
        predicted = model.predictor(model.encoder(pixels, [ctx]), [ctx], [targets[0].unsqueeze(0)],
                                    grid_size=(GRID, GRID))[0]
        width = (model.config.embed_dim,)
        on_target = torch.nn.functional.layer_norm(model.target_encoder(pixels)[0], width)[targets[0]]
        on_context = torch.nn.functional.layer_norm(model.encoder(pixels)[0], width)[targets[0]]
    torch.testing.assert_close(box.predicted, predicted, atol=1e-5, rtol=0)
    torch.testing.assert_close(box.true, on_target, atol=1e-5, rtol=0)
    assert (on_context - on_target).abs().max() > 0.1  # the two encoders really differ here


def test_probe_and_neighbours_read_the_prediction_and_the_truth_row_reads_the_truth(trained_like_engine):
    """The Probe and Neighbours panels say what the PREDICTOR expects; only "on the truth" reads the real box."""
    engine = trained_like_engine
    image = np.random.default_rng(9).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    analysis = engine.analyze(image, [[8, 8, 24, 20]])
    report, box = analysis.reports[0], analysis.result.boxes[0]
    predicted, true = box.pooled_predicted, box.pooled_true
    assert report.probe == {name: p.top_k(predicted, 5) for name, p in engine.probes.items()}
    assert report.probe_on_truth == {name: p.top_k(true, 1) for name, p in engine.probes.items()}
    assert report.probe != {name: p.top_k(true, 5) for name, p in engine.probes.items()}  # they tell apart
    bank = engine.bank
    expected, _ = nearest_neighbours(bank.features, predicted, 6, centre=bank.centre)
    assert [n.index for n in report.neighbours] == expected.tolist()
    assert [n.label for n in report.neighbours] == [bank.label_of(i) for i in expected.tolist()]
    uncentred, _ = nearest_neighbours(bank.features, predicted, 6)
    from_truth, _ = nearest_neighbours(bank.features, true, 6, centre=bank.centre)
    assert uncentred.tolist() != expected.tolist() and from_truth.tolist() != expected.tolist()


def test_window_positions_cover_every_patch():
    for grid, window, stride in [((8, 8), (2, 2), 1), ((16, 16), (4, 4), 2), ((7, 9), (3, 2), 3)]:
        covered = np.zeros(grid, bool)
        for r, c in window_positions(grid, window, stride):
            covered[r:r + window[0], c:c + window[1]] = True
        assert covered.all()


def test_surprise_map_equals_hiding_each_window_alone(bundle):
    """Each window's error is the box analysis's: the window hidden from the context encoder. Both encoders are
    moved off the random bundle's init, so that a window reaching the context through attention would show."""
    engine = Engine.load(bundle, device="cpu")
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in [*engine.model.encoder.parameters(), *engine.model.target_encoder.parameters()]:
            p.add_(0.5 * torch.randn(p.shape, generator=generator))
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    errors = surprise_map(engine.model, image, window=4, stride=4, batch_size=3)  # 4 tiles, uneven batches
    assert errors.shape == (GRID, GRID) and torch.isfinite(errors).all() and (errors > 0).all()
    for top, left in [(0, 0), (4, 4)]:
        context, targets = boxes_to_masks([(left * PATCH, top * PATCH, (left + 4) * PATCH, (top + 4) * PATCH)],
                                          (SIZE, SIZE), GRID)
        alone = analyze_boxes(engine.model, image, context, targets).boxes[0].errors.view(4, 4)
        torch.testing.assert_close(errors[top:top + 4, left:left + 4], alone, atol=1e-6, rtol=1e-5)
    # overlapping windows (stride 1): each patch gets the MEAN error of the windows that hid it
    overlapping = surprise_map(engine.model, image, window=2, stride=1)

    def hidden_alone(top: int, left: int) -> torch.Tensor:
        context, targets = boxes_to_masks([(left * PATCH, top * PATCH, (left + 2) * PATCH, (top + 2) * PATCH)],
                                          (SIZE, SIZE), GRID)
        return analyze_boxes(engine.model, image, context, targets).boxes[0].errors.view(2, 2)

    torch.testing.assert_close(overlapping[0, 0], hidden_alone(0, 0)[0, 0], atol=1e-4, rtol=1e-4)  # one window
    covering = [hidden_alone(3, 4)[1, 1], hidden_alone(3, 5)[1, 0], hidden_alone(4, 4)[0, 1], hidden_alone(4, 5)[0, 0]]
    torch.testing.assert_close(overlapping[4, 5], torch.stack(covering).mean(), atol=1e-4, rtol=1e-4)
    overview = engine.surprise_map(np.asarray(image.permute(1, 2, 0) * 255, dtype=np.uint8))
    assert overview.errors.shape == (GRID, GRID) and overview.window == (2, 2) and overview.figure.ndim == 3
    with pytest.raises(ValueError, match="window"):
        engine.surprise_map(np.zeros((32, 32, 3), np.uint8), window=GRID)


def test_the_surprise_map_of_an_image_is_computed_once_per_window(engine, monkeypatch):
    """The app redraws it after every run; it depends only on the image and the window."""
    calls = []
    real = engine_module.surprise_map
    monkeypatch.setattr(engine_module, "surprise_map", lambda *a, **k: calls.append(a[2:]) or real(*a, **k))
    image = np.random.default_rng(5).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    first = engine.surprise_map(image)
    assert engine.surprise_map(image.copy()) is first and len(calls) == 1  # the same pixels: no second pass
    assert engine.surprise_map(image, window=3).window == (3, 3) and len(calls) == 2  # another window: computed
    other = image.copy()
    other[20, 25] ^= 255  # inside the centre square the model sees
    assert not np.array_equal(engine.surprise_map(other).errors, first.errors) and len(calls) == 3


def test_feature_pca_separates_distinct_regions():
    rng = torch.Generator().manual_seed(3)
    a, b = torch.randn(16, generator=rng), torch.randn(16, generator=rng)
    features = torch.stack([a if i < 8 else b for i in range(16)]) + 0.01 * torch.randn(16, 16, generator=rng)
    rgb = feature_pca(features, (4, 4))
    assert rgb.shape == (4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    first = rgb.view(16, 3)[:, 0]  # the leading component carries the two-region structure
    assert first[:8].max() - first[:8].min() < 0.05 and first[8:].max() - first[8:].min() < 0.05
    assert (first[:8].mean() - first[8:].mean()).abs() > 0.9
    torch.testing.assert_close(feature_pca(features, (4, 4)), rgb)


def test_feature_pca_is_the_top_three_components_with_fixed_signs():
    """The PCA view's colours are the patches' scores on the top three principal components (over patches),
    each with its largest loading made positive, so the same features always give the same colours."""
    features = torch.randn(16, 12, generator=torch.Generator().manual_seed(6)) * torch.linspace(3, 0.5, 12)
    centred = features.double().numpy() - features.double().numpy().mean(axis=0)
    _, _, vh = np.linalg.svd(centred, full_matrices=False)
    components = vh[:3] * np.sign(vh[:3][np.arange(3), np.abs(vh[:3]).argmax(axis=1)])[:, None]
    projected = centred @ components.T
    expected = (projected - projected.min(0)) / (projected.max(0) - projected.min(0))
    np.testing.assert_allclose(feature_pca(features, (4, 4)).view(16, 3).numpy(), expected, atol=1e-5)
    flipped = centred @ -components.T  # what either sign choice of an SVD could give without the fix
    assert not np.allclose(expected, (flipped - flipped.min(0)) / (flipped.max(0) - flipped.min(0)), atol=1e-3)


def test_feature_view_renders(engine):
    view = engine.feature_view(np.zeros((50, 60, 3), np.uint8))
    assert view.ndim == 3 and view.shape[2] == 3 and view.dtype == np.uint8


def test_probe_readout_matches_the_training_probe(tmp_path):
    from train.eval import LinearProbe, save_probe

    torch.manual_seed(0)
    probe = LinearProbe(12, 7)
    probe.mean.normal_()
    probe.std.uniform_(0.5, 2.0)
    labels = [f"class {i}" for i in range(7)]
    save_probe(probe, labels, tmp_path / "probe_subgroup")
    readout = load_probe(tmp_path / "probe_subgroup.safetensors", 12)
    features = torch.randn(12)
    expected = torch.softmax(probe(features[None]), dim=-1)[0]
    torch.testing.assert_close(readout.probabilities(features), expected.detach())
    top = readout.top_k(features, 5)
    assert [label for label, _ in top] == [labels[i] for i in expected.topk(5).indices.tolist()]
    with pytest.raises(ValueError, match="reads 12-d features"):
        load_probe(tmp_path / "probe_subgroup.safetensors", 13)
    with pytest.raises(ValueError, match="label names"):
        LinearReadout.from_state_dict(probe.state_dict(), labels[:3])


def test_nearest_neighbours_finds_the_same_direction():
    bank = torch.randn(20, 8, generator=torch.Generator().manual_seed(4))
    indices, sims = nearest_neighbours(bank, 3.0 * bank[7], k=4)
    assert indices[0] == 7 and sims[0] == pytest.approx(1.0) and sims.shape == (4,)
    assert (sims[:-1] >= sims[1:]).all()
    # Box features share a large common direction: raw cosines crowd near 1 for every entry, centred ones spread
    shared = bank + 10.0
    _, raw = nearest_neighbours(shared, shared[7] + 0.1 * torch.randn(8), k=20)
    indices, centred = nearest_neighbours(shared, shared[7], k=20, centre=shared.mean(0))
    assert float(raw.min()) > 0.9 and indices[0] == 7 and float(centred.min()) < 0.0


def test_errors_come_with_a_guess_that_needs_no_predictor_for_scale(engine):
    """Zeros score 1.0 against layer-normed features, a meaningless bar; the visible patches' average is the one
    a prediction must clear, shown beside each box's error."""
    image = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    analysis = engine.analyze(image, [[40, 0, 100, 60]])
    box, truth = analysis.result.boxes[0], analysis.result.true_features
    average = truth[analysis.result.context_indices].mean(0)
    expected = (truth[box.target_indices] - average).pow(2).mean(-1)
    torch.testing.assert_close(box.baseline_errors, expected, rtol=1e-5, atol=1e-6)
    assert analysis.metrics()["boxes"][0]["visible_average_error"] == round(box.baseline_error, 4)
    text = panels.explanation(analysis, engine.conditioning_of(None))
    assert f"copying the visible average (which scores {box.baseline_error:.2f})" in text


def test_the_explanation_verdict_agrees_with_the_figures_it_shows(engine):
    """0.1531 against 0.1531 had read "error 0.15, better than ... (visible average: 0.15)"; and one sketch is no
    "1 sketches" that differ."""
    analysis = engine.analyze(np.zeros((64, 64, 3), np.uint8), [[16, 16, 40, 40]])
    report = analysis.reports[0]
    for error, bar, verdict in ((0.15312, 0.15314, "about as good as"), (0.12, 0.15, "better than"),
                                (0.18, 0.15, "no better than")):
        analysis.reports[0] = dataclasses.replace(report, error=error, baseline_error=bar)
        assert f"error **{error:.2f}**, {verdict} copying the visible average" in panels.explanation(analysis, None)
    decoder = engine.conditioning_of(None)
    assert "**Why the 3 sketches differ.**" in panels.explanation(analysis, decoder, 3)
    one = panels.explanation(analysis, decoder, 1)
    assert "1 sketches" not in one and "draw two or more to compare them" in one


def test_the_explanation_quotes_every_probe_coarse_first(engine):
    """The gallery is chosen where both the group and the subgroup readings are right, so the explanation beside it
    quotes both, group first; quoting the subgroup alone showed a wrong fine label under a right group."""
    image = np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    analysis = engine.analyze(image, [[40, 0, 100, 60]])
    probe = analysis.reports[0].probe
    assert list(probe) == ["group", "subgroup"]
    text = panels.explanation(analysis, engine.conditioning_of(None))
    quoted = [f"{name} *{top[0][0]}* ({top[0][1]:.0%})" for name, top in probe.items()]
    assert f"the probes read the guess as {quoted[0]}, {quoted[1]}" in text


# ----- sketches: streamed, exact context, reproducible ---------------------------------------------------------

@pytest.fixture(scope="module")
def two_box_analysis(engine):
    image = np.random.default_rng(5).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    return engine.analyze(image, [[25, 25, 75, 75], [100, 100, 175, 150]])


def test_sketches_stream_first_one_early_with_exact_context(engine, two_box_analysis):
    updates = list(engine.stream_sketches(two_box_analysis, num_samples=3, seed=7, num_steps=STEPS))
    assert [u.sample_indices for u in updates] == [(0,), (0, 1, 2)]
    assert [u.done for u in updates] == [False, True] and updates[0].seconds <= updates[1].seconds
    base = two_box_analysis.prepared.to_uint8()
    outside = ~np.logical_or.reduce(two_box_analysis.box_masks())
    for image in updates[-1].images:
        assert image.shape == base.shape and image.dtype == np.uint8
        np.testing.assert_array_equal(image[outside], base[outside])
        assert not np.array_equal(image[~outside], base[~outside])
    np.testing.assert_array_equal(updates[0].images[0], updates[-1].images[0])
    gallery = panels.sketch_gallery(two_box_analysis, updates[-1])
    assert len(gallery) == 3 and gallery[2][1].startswith("Sketch 3 of 3 · Detailed decoder · seed 7")
    pooled = panels.sketch_gallery(two_box_analysis, dataclasses.replace(updates[-1], conditioning="pooled"))
    assert pooled[0][1].startswith("Sketch 1 of 3 · Pooled decoder · seed 7")  # which decoder drew what is shown


def test_sketches_are_reproducible_from_the_seed(engine, two_box_analysis):
    first = engine.sketches(two_box_analysis, num_samples=2, seed=11, num_steps=STEPS).images
    again = engine.sketches(two_box_analysis, num_samples=2, seed=11, num_steps=STEPS).images
    other = engine.sketches(two_box_analysis, num_samples=2, seed=12, num_steps=STEPS).images
    for a, b in zip(first, again):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert np.abs(first[0].astype(int) - other[0].astype(int)).max() > 10
    assert np.abs(first[0].astype(int) - first[1].astype(int)).max() > 10  # samples differ from each other


def test_truth_vs_prediction_decodes_both(engine, two_box_analysis):
    truth = engine.decode_truth(two_box_analysis, seed=3, num_steps=STEPS)
    predicted = engine.sketches(two_box_analysis, 1, seed=3, num_steps=STEPS)
    assert truth.shape == predicted.box_images[0].shape == (2, SIZE, SIZE, 3)  # per box
    assert np.abs(truth.astype(int) - predicted.box_images[0].astype(int)).max() > 0  # different features
    figure = engine.truth_vs_prediction(two_box_analysis, predicted, seed=3, num_steps=STEPS)
    assert figure.ndim == 3 and figure.shape[2] == 3 and figure.shape[0] > 200
    # the decoded truth under "true features", the sketch under "prediction": not swapped on the way to the figure
    assert np.array_equal(figure, render_truth_vs_prediction(two_box_analysis, truth, predicted.box_images[0], PATCH))
    # the app's stop reaches the decoding of the truth and of a prediction not drawn yet
    for should_stop_after in (0, STEPS):  # the truth's steps, then the prediction's
        asked = []
        with pytest.raises(WorkStopped):
            engine.truth_vs_prediction(two_box_analysis, None, seed=3, num_steps=STEPS,
                                       should_stop=lambda: asked.append(1) or len(asked) > should_stop_after)
        assert len(asked) == should_stop_after + 1


def test_overlapping_boxes_each_keep_their_own_sketch(engine):
    """The composite shows the later box where two overlap; each box's own panels (its crop in the sketch sheet, its
    row of truth vs prediction) must still show the whole of its own sketch, not the other box's."""
    image = np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    quarter = SIZE // 4
    analysis = engine.analyze(image, [[0, 0, 2 * quarter, 2 * quarter], [quarter, quarter, 3 * quarter, 3 * quarter]])
    first, second = analysis.box_masks()
    overlap = first & second
    assert overlap.any()
    update = engine.sketches(analysis, 1, seed=2, num_steps=STEPS)
    composite, own = update.images[0], update.box_images[0]
    base = analysis.prepared.to_uint8()
    outside = ~(first | second)
    for fill in own:
        np.testing.assert_array_equal(fill[outside], base[outside])  # the context stays exact
    np.testing.assert_array_equal(composite[second], own[1][second])  # the later box on top
    np.testing.assert_array_equal(composite[first & ~second], own[0][first & ~second])
    assert np.abs(own[0][overlap].astype(int) - own[1][overlap].astype(int)).max() > 10  # two different sketches
    assert (own[0][second & ~first] == HIDDEN_GREY).all()  # the other box is hidden, not its truth or its sketch
    gw = analysis.result.grid_size[1]
    x0, y0, x1, y1 = patch_bounds(analysis.result.boxes[0], gw, PATCH)
    scale = 4
    panel = sketch_sheet(composite, own, analysis, scale=scale)[:, SIZE * scale + 8:]

    def shown(crop: np.ndarray) -> bool:  # the crop, enlarged by some whole factor, inside its 2-px frame
        for factor in range(1, 9):
            inner = upscale(crop, factor)[2:-2, 2:-2]
            h, w = inner.shape[:2]
            if h and any(np.array_equal(panel[r:r + h, c:c + w], inner)
                         for r in range(panel.shape[0] - h + 1) for c in range(panel.shape[1] - w + 1)):
                return True
        return False

    assert shown(own[0][y0:y1, x0:x1]) and not shown(composite[y0:y1, x0:x1])


def test_sketch_sheet_crops_stay_in_their_own_slots(engine):
    """At display scale 1 (models of 129 px and more) two full-height boxes must not overlap in the crop column."""
    image = np.random.default_rng(9).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    analysis = engine.analyze(image, [[0, 0, 2 * PATCH, SIZE], [SIZE - 2 * PATCH, 0, SIZE, SIZE]])
    sheet = sketch_sheet(image, np.stack([image, image]), analysis, scale=1)
    panel = sheet[:, SIZE + 8:]
    slot = SIZE // 2
    for b in range(2):
        rows = np.nonzero((panel == np.array(BOX_COLORS[b])).all(axis=-1))[0]
        assert rows.size and b * slot <= rows.min() and rows.max() < (b + 1) * slot


def test_the_bundle_offers_both_decoders_and_each_draws_its_own_sketches(engine, two_box_analysis):
    assert engine.conditionings == ("spatial_context", "pooled")  # ours is the default
    ours = engine.sketches(two_box_analysis, 1, seed=4, num_steps=STEPS)
    paper = engine.sketches(two_box_analysis, 1, seed=4, num_steps=STEPS, conditioning="pooled")
    assert (ours.conditioning, paper.conditioning) == ("spatial_context", "pooled")
    assert np.abs(ours.images[0].astype(int) - paper.images[0].astype(int)).max() > 10
    again = engine.sketches(two_box_analysis, 1, seed=4, num_steps=STEPS, conditioning="spatial_context")
    assert np.abs(again.images[0].astype(int) - ours.images[0].astype(int)).max() <= 1
    streamed = list(engine.stream_sketches(two_box_analysis, 1, seed=4, num_steps=STEPS, conditioning="pooled"))
    assert streamed[-1].conditioning == "pooled"
    assert np.abs(streamed[-1].images[0].astype(int) - paper.images[0].astype(int)).max() <= 1
    # truth vs prediction reuses the first sketch only when the same decoder drew it
    figure = engine.truth_vs_prediction(two_box_analysis, ours, seed=4, num_steps=STEPS, conditioning="pooled")
    assert figure.ndim == 3
    assert "decoder, Pooled (as in the I-JEPA" in engine.describe() and "decoder, Detailed" in engine.describe()
    assert "average" in panels.explanation(two_box_analysis, engine.conditioning_of("pooled"), 1)
    assert "average of the box" not in panels.explanation(two_box_analysis, engine.conditioning_of(None), 1)
    with pytest.raises(ValueError, match="No 'spatial' sketch decoder.*'pooled'"):
        engine.sketches(two_box_analysis, 1, num_steps=STEPS, conditioning="spatial")


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_samples=0), "between 1 and 8"), (dict(num_samples=9), "between 1 and 8"),
    (dict(num_steps=0), "steps"), (dict(seed=-1), "seed"),
])
def test_sampling_arguments_are_checked(engine, two_box_analysis, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.sketches(two_box_analysis, **{"num_steps": STEPS, **kwargs})


# ----- bundles with parts missing -----------------------------------------------------------------------------

def test_missing_parts_switch_panels_off_with_explanations(bundle, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(bundle / "model", partial / "model")
    engine = Engine.load(partial, device="cpu")
    assert not engine.has_decoder and not engine.probes and engine.bank is None and engine.examples == []
    text = engine.describe()
    assert "python -m train.decoder --checkpoint" in text and "probe" in text and "bank" in text
    assert "Model card" not in text and engine.model_card() == ""
    (partial / "MODEL_CARD.md").write_text("# card\n")
    with_card = Engine.load(partial, device="cpu")
    assert "**Model card** (below; `" in with_card.describe()  # named where the page can say it
    assert with_card.model_card() == "# card\n"  # and shown on the page: a visitor cannot open the server's file
    official = partial / "IN1K-vit.tiny.pth.tar"  # a checkpoint file dropped beside that card: not its story
    model = load_model(partial / "model")
    torch.save({name: getattr(model, name).state_dict() for name in ("encoder", "predictor", "target_encoder")},
               official)
    from_file = Engine.load(checkpoint=official, device="cpu")
    assert from_file.model_card() == "" and "Model card" not in from_file.describe()
    analysis = engine.analyze(np.zeros((64, 64, 3), np.uint8), [[16, 16, 40, 40]])
    assert analysis.reports[0].probe == {} and analysis.reports[0].neighbours == ()
    with pytest.raises(ValueError, match="python -m train.decoder"):
        next(engine.stream_sketches(analysis))
    assert engine.truth_vs_prediction(analysis).ndim == 3  # the error map needs no decoder
    assert panels.neighbour_gallery(analysis, engine.bank) == []
    assert "probe" in panels.readout_markdown(analysis, engine.note_on("probe", "none")).lower()
    assert engine.conditioning_of(None) is None  # so the explanation says nothing about sketches
    text = panels.explanation(analysis, engine.conditioning_of(None))
    assert "What it guessed" in text and "sketch" not in text.lower()


def test_checkpoint_flag_uses_only_the_given_decoders(bundle, tmp_path):
    engine = Engine.load(bundle, checkpoint=bundle / "model", decoder=bundle / "decoder", device="cpu")
    assert engine.conditionings == ("spatial_context",) and len(engine.examples) == 2
    assert engine.probes and engine.bank is not None  # the bundle's own model, named: its readouts still apply
    shutil.copytree(bundle / "model", tmp_path / "other_model")
    other = Engine.load(bundle, checkpoint=tmp_path / "other_model", device="cpu")
    assert not other.probes and other.bank is None and "belong to the bundled model" in other.describe()
    both = Engine.load(bundle, checkpoint=bundle / "model", decoder=[bundle / "decoder_paper", bundle / "decoder"],
                       device="cpu")
    assert both.conditionings == ("pooled", "spatial_context")  # the first given is the default
    with pytest.raises(ValueError, match="both 'pooled' decoders"):
        Engine.load(bundle, checkpoint=bundle / "model", decoder=[bundle / "decoder_paper"] * 2, device="cpu")
    assert engine.info.img_size == SIZE and "random weights" in engine.info.trained_on
    model_only = Engine.load(bundle / "model", device="cpu")  # a model folder as the first argument
    assert not model_only.has_decoder and model_only.examples == [] and model_only.info.source.endswith("model")


def test_load_errors_say_what_to_do(bundle, tmp_path):
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        Engine.load(tmp_path)
    other = IJepaConfig.from_arch("vit_tiny", img_size=64, patch_size=4, depth=1, predictor_depth=1,
                                  predictor_embed_dim=48)
    build_random_bundle(tmp_path / "other", other, None, num_examples=0)
    with pytest.raises(ValueError, match="train a decoder for this model"):
        Engine.load(tmp_path / "other", decoder=bundle / "decoder", device="cpu")
    # Same shapes, other weights (ViT-H/14 IN-1K vs IN-22K): the decoder would draw another model's feature space.
    same_shapes = load_model(bundle / "model").config
    build_random_bundle(tmp_path / "same_shapes", same_shapes, None, num_examples=0, seed=1)
    with pytest.raises(ValueError, match="learnt another model's features"):
        Engine.load(tmp_path / "same_shapes", decoder=bundle / "decoder", device="cpu")
    save_model(load_model(bundle / "model"), tmp_path / "fp16_copy", dtype=torch.float16)  # as a bundle ships it
    assert Engine.load(tmp_path / "fp16_copy", decoder=bundle / "decoder", device="cpu").has_decoder
    truncated = tmp_path / "truncated_decoder"
    shutil.copytree(bundle / "decoder", truncated)
    weights = next(truncated.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:4000])
    with pytest.raises(ValueError, match="cannot read the sketch decoder .*truncated"):
        Engine.load(bundle, checkpoint=bundle / "model", decoder=truncated, device="cpu")
    with pytest.raises(ValueError, match="is a model folder .*not a sketch decoder: load it with --checkpoint"):
        Engine.load(bundle, decoder=bundle / "model", device="cpu")  # the folders mixed up
    run = tmp_path / "decoder_run"  # train.decoder's --out-dir, which holds the decoder in decoder/
    shutil.copytree(bundle / "decoder", run / "decoder")
    with pytest.raises(FileNotFoundError, match=f"is a decoder run folder: its decoder is {run / 'decoder'}"):
        Engine.load(bundle, decoder=run, device="cpu")
    mismatched = tmp_path / "mismatched_decoder"
    shutil.copytree(bundle / "decoder_paper", mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["block_out_channels"] = [2 * c for c in config["block_out_channels"]]
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"weights do not fit its config\.json.*size mismatch.*--conditioning pooled"):
        Engine.load(bundle, checkpoint=bundle / "model", decoder=mismatched, device="cpu")
    # weights with keys left out or to spare: diffusers only warns (a missing weight stays uninitialised memory)
    weights = load_file(bundle / "decoder_paper" / "diffusion_pytorch_model.safetensors")
    fewer = next(key for key in weights if key.startswith("pooled_embedding"))
    for name, kept in (("missing", {k: v for k, v in weights.items() if k != fewer}),
                       ("unexpected", {**weights, "extra.weight": torch.zeros(2)})):
        folder = tmp_path / f"{name}_keys_decoder"
        shutil.copytree(bundle / "decoder_paper", folder)
        save_file(kept, folder / "diffusion_pytorch_model.safetensors")
        with pytest.raises(ValueError, match=rf"weights do not fit its config\.json.*{name} keys: "
                                             rf"{fewer if name == 'missing' else 'extra.weight'}"):
            Engine.load(bundle, checkpoint=bundle / "model", decoder=folder, device="cpu")


def test_the_recipes_out_dir_given_as_the_bundle_is_pointed_at_its_bundle(tmp_path):
    out = tmp_path / "runs" / "default"
    (out / "bundle" / "model").mkdir(parents=True)
    (out / "bundle" / "model" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=rf"no model in {out}/model .*out-dir of python -m train.default: "
                                                rf"its bundle is {out}/bundle\)\. Pass --checkpoint"):
        Engine.load(out, device="cpu")


def test_the_decoder_hint_asks_for_images_only_for_a_model_that_did_not_learn_the_emoji_world():
    official = IJepaConfig.from_arch("vit_tiny", img_size=SIZE, patch_size=PATCH, depth=1)
    assert train_decoder_hint("IN1K-vit.h.14-300e.pth.tar", official) == \
        "python -m train.decoder --checkpoint IN1K-vit.h.14-300e.pth.tar --data /path/to/images"
    ours = IJepaConfig.from_dict({**official.to_dict(), "data_fingerprint": "0e4d6c002657"})
    assert train_decoder_hint("assets/model", ours, "pooled") == \
        "python -m train.decoder --checkpoint assets/model --conditioning pooled"


def test_damaged_optional_parts_switch_their_panel_off_instead_of_stopping_the_app(bundle, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    (damaged / "probe_subgroup.json").unlink()
    (damaged / "bank.json").write_text("{not json")
    next((damaged / "examples").glob("*.png")).unlink()
    weights = next((damaged / "decoder_paper").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:4000])
    engine = Engine.load(damaged, device="cpu")
    assert "subgroup" not in engine.probes and engine.bank is None and len(engine.examples) == 1
    assert engine.conditionings == ("spatial_context",)  # the damaged paper decoder is off, ours still draws
    notes = " ".join(engine.notes)
    assert "subgroup probe could not be read" in notes and "reference bank could not be read" in notes
    assert "those examples are left out" in notes
    assert "decoder_paper could not be loaded" in notes and "--conditioning pooled" in notes
    engine.analyze(engine.examples[0].image(), engine.examples[0].boxes)


def test_damaged_example_images_or_a_second_decoder_of_one_kind_in_a_bundle_leave_the_rest_working(bundle, tmp_path):
    """A review found that one example image cut short stopped the app at start-up, and a decoder folder copied over
    the other kind's refused the whole bundle."""
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    first, second = sorted((damaged / "examples").glob("*.png"))
    first.write_bytes(first.read_bytes()[:200])
    second.write_bytes(b"")
    shutil.rmtree(damaged / "decoder_paper")
    shutil.copytree(damaged / "decoder", damaged / "decoder_paper")
    engine = Engine.load(damaged, device="cpu")
    assert engine.examples == [] and engine.conditionings == ("spatial_context",)
    notes = " ".join(engine.notes)
    assert f"cannot be read are left out: {first.name} (" in notes and second.name in notes
    assert "decoder_paper holds a second 'spatial_context' decoder" in notes
    with pytest.raises(ValueError, match=first.name):  # tools that write bundles must not ship one with holes
        load_examples(damaged / "examples")


def test_probes_and_bank_made_from_another_model_are_refused_like_its_decoders(bundle, tmp_path):
    """A bundle whose model/ was replaced by another model of the same shapes: the decoders were refused, but the
    probes and bank loaded silently and read the new model's features with the old one's weights (a review)."""
    swapped = tmp_path / "swapped"
    shutil.copytree(bundle, swapped)
    config = load_model(bundle / "model").config
    build_random_bundle(tmp_path / "other", config, None, num_examples=0, seed=1)
    shutil.rmtree(swapped / "model")
    shutil.copytree(tmp_path / "other" / "model", swapped / "model")
    engine = Engine.load(swapped, device="cpu")
    assert not engine.has_decoder and not engine.probes and engine.bank is None
    notes = " ".join(engine.notes)
    assert "probe_group was made from another model's features" in notes
    assert "bank was made from another model's features" in notes
    mine = Engine.load(bundle, device="cpu")  # the bundle as written keeps every panel
    assert mine.has_decoder and set(mine.probes) == {"group", "subgroup"} and mine.bank is not None


def test_a_probe_or_bank_that_does_not_fit_its_labels_switches_its_panel_off(bundle, tmp_path):
    """A garbled probe file, or a bank naming a label that is not there, turns its panel off with a note."""
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    (damaged / "probe_group.safetensors").write_bytes(b"not a safetensors file")
    bank = load_file(damaged / "bank.safetensors")
    labels = json.loads((damaged / "bank.json").read_text())["labels"]
    bank["subgroup"][0] = len(labels)  # one past the last label
    save_file(bank, damaged / "bank.safetensors")
    engine = Engine.load(damaged, device="cpu")
    assert "group" not in engine.probes and "subgroup" in engine.probes and engine.bank is None
    notes = " ".join(engine.notes)
    assert "group probe could not be read" in notes and "reference bank could not be read" in notes


def test_bank_entries_are_labelled_by_their_own_subgroup(engine):
    """Neighbours are captioned with the label their bank entry records, whatever the entries' order."""
    bank = engine.bank
    shuffled = dataclasses.replace(bank, subgroup=bank.subgroup.flip(0))
    assert [shuffled.label_of(i) for i in range(len(bank.subgroup))] == [
        bank.labels[int(k)] for k in bank.subgroup.flip(0)]


def test_the_decoder_runs_in_bf16_where_bf16_is_native(bundle):
    from ijepa.device import fast_bf16

    assert Engine.load(bundle, device="cpu").bf16 == fast_bf16(torch.device("cpu"))  # precision "auto"
    assert not Engine.load(bundle, device="cpu", precision="fp32").bf16
    assert Engine.load(bundle, device="cpu", precision="bf16").bf16
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        Engine.load(bundle, device="cpu", precision="half")


def test_a_device_that_is_not_there_is_named(bundle):
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        Engine.load(bundle, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU.*--device cpu"):
            Engine.load(bundle, device="cuda")


def test_a_gpu_number_that_is_not_there_is_named(monkeypatch):
    from ijepa.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1"
    for device in ("cuda:2", "cuda:x"):
        with pytest.raises(ValueError, match=r"sees 2 CUDA GPU\(s\), numbered 0 to 1"):
            resolve_device(device)


def test_examples_load_with_their_boxes(engine):
    assert len(engine.examples) == 2
    for example in engine.examples:
        image = example.image()
        assert image.dtype == np.uint8 and image.shape[2] == 3
        analysis = engine.analyze(image, example.boxes)  # every shipped example works as is
        assert len(analysis.result.boxes) == len(example.boxes)
        for box in analysis.result.boxes:  # each box hides patches and gets a finite error against a real baseline
            assert box.target_indices.numel() > 0 and np.isfinite(box.error) and box.baseline_error > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the device machine)")
def test_every_panel_works_with_the_model_on_a_gpu(bundle):
    engine = Engine.load(bundle, device="cuda")
    image = np.random.default_rng(5).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    analysis = engine.analyze(image, [[25, 25, 75, 75]])
    update = engine.sketches(analysis, num_samples=2, seed=1, num_steps=STEPS)
    assert len(update.images) == 2 and update.images[0].dtype == np.uint8
    assert engine.decode_truth(analysis, seed=1, num_steps=STEPS).shape == (len(analysis.result.boxes), SIZE, SIZE, 3)
    assert engine.surprise_map(image).errors.shape == (GRID, GRID)
    assert engine.feature_view(image).ndim == 3


def test_the_app_conditions_its_decoder_exactly_as_training_did(engine):
    """For one box, the app's decoder input (tokens, patches, blanked context, box mask) is the one
    train.decoder built for the same image and box: a decoder sees in the app what it learnt from."""
    image = np.random.default_rng(8).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    analysis = engine.analyze(image, [[30, 20, 80, 70]])
    app = engine._conditions(analysis, lambda box: box.predicted)
    box = analysis.result.boxes[0]
    trained = box_conditions(engine.model, analysis.prepared.pixels.unsqueeze(0), box.target_indices.unsqueeze(0),
                             analysis.result.context_indices.unsqueeze(0))
    torch.testing.assert_close(app.tokens, trained.tokens, rtol=1e-5, atol=1e-5)
    for field in ("patch_indices", "context", "box_mask"):
        assert torch.equal(getattr(app, field), getattr(trained, field)), field


def test_nothing_under_the_hidden_patches_reaches_the_prediction(engine):
    """Repaint every pixel of the hidden patches: the prediction stays bit-identical, the truth changes."""
    image = np.random.default_rng(9).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    analysis = engine.analyze(image, [[25, 25, 75, 75], [100, 100, 175, 150]])
    pixels = analysis.prepared.pixels.unsqueeze(0)
    hidden = torch.cat([b.target_indices for b in analysis.result.boxes]).unsqueeze(0)
    under = box_mask_from_indices(hidden, engine.model.config.grid_size, tuple(pixels.shape[-2:])).bool()
    repainted = torch.where(under, torch.rand_like(pixels), pixels)
    assert (repainted != pixels).any()
    again = analyze_boxes(engine.model, repainted, analysis.result.context_indices,
                          [b.target_indices for b in analysis.result.boxes])
    for before, after in zip(analysis.result.boxes, again.boxes):
        assert torch.equal(before.predicted, after.predicted)
        assert not torch.allclose(before.true, after.true)



@pytest.mark.parametrize("side, box", [
    (200, (25, 25, 75, 75)),  # shrunk 6.25x: the box is model pixels 4-12, patches 1-2
    (250, (31.25, 31.25, 125, 125)),  # shrunk 7.8125x, patch borders between image pixels
    (12, (3, 3, 9, 9)),  # a small upload, enlarged 2.67x
])
def test_nothing_under_a_box_in_the_users_image_reaches_the_prediction(engine, side, box):
    """Repaint the user's pixels inside a box that lies on patch borders: the resize to the model's size must not
    carry them into the context (bicubic did, by up to 2 image pixels, and by over a patch when enlarging)."""
    rng = np.random.default_rng(side)
    image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    repainted = image.copy()
    x0, y0, x1, y1 = (int(np.ceil(box[0])), int(np.ceil(box[1])), int(box[2]), int(box[3]))  # whole pixels inside
    repainted[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 3), dtype=np.uint8)
    before, after = engine.analyze(image, [list(box)]), engine.analyze(repainted, [list(box)])
    assert torch.equal(before.result.context_indices, after.result.context_indices)
    assert torch.equal(before.result.boxes[0].predicted, after.result.boxes[0].predicted)
    assert not torch.equal(before.result.boxes[0].true, after.result.boxes[0].true)

# ----- limits and figures: what the user sees matches the data ---------------------------------------------------

def test_the_most_boxes_allowed_are_all_analysed(engine):
    """The intro promises MAX_BOXES boxes at once: exactly that many must be accepted, and one more refused."""
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    # one patch each, side by side, staggered so that no two touch
    row = [[PATCH * i, PATCH * (i % 2), PATCH * (i + 1), PATCH * (i % 2 + 1)] for i in range(MAX_BOXES + 1)]
    assert len(engine.analyze(image, row[:MAX_BOXES]).reports) == MAX_BOXES
    with pytest.raises(InputError, match=f"at most {MAX_BOXES}"):
        engine.analyze(image, row)


@pytest.fixture
def colorbar_tops(monkeypatch):
    """The top (norm.vmax) of every colour bar a figure draws, in order."""
    tops, original = [], Figure.colorbar

    def spy(self, mappable, *args, **kwargs):
        tops.append(float(mappable.norm.vmax))
        return original(self, mappable, *args, **kwargs)

    monkeypatch.setattr(Figure, "colorbar", spy)
    return tops


def test_the_surprise_colour_bar_spans_the_maps_own_errors(colorbar_tops):
    """A fixed 1.0 top left a trained model's small errors all dark (or clipped large ones): the bar must span the
    map."""
    errors = np.linspace(0.0, 0.37, GRID * GRID).reshape(GRID, GRID)
    render_surprise(np.zeros((SIZE, SIZE, 3), np.uint8), errors, 2)
    render_surprise(np.zeros((SIZE, SIZE, 3), np.uint8), errors * 10, 2)
    assert colorbar_tops == pytest.approx([0.37, 3.7])


def test_the_error_maps_share_a_scale_that_reaches_every_boxs_largest_error(engine, two_box_analysis, colorbar_tops):
    """The error maps share one colour bar: its top must be the largest error of any box, or box 2's saturate."""
    first, second = two_box_analysis.result.boxes
    louder = dataclasses.replace(second, errors=second.errors + float(first.errors.max()) + 1.0)
    analysis = dataclasses.replace(two_box_analysis,
                                   result=dataclasses.replace(two_box_analysis.result, boxes=[first, louder]))
    render_truth_vs_prediction(analysis, None, None, PATCH)
    assert colorbar_tops == pytest.approx([float(louder.errors.max())])


def test_truth_and_prediction_are_drawn_under_their_own_titles(engine, monkeypatch):
    """Readers compare the decoded truth with the prediction by their titles: swapped columns reverse the verdict."""
    analysis = engine.analyze(np.zeros((SIZE, SIZE, 3), np.uint8), [[0, 0, 2 * PATCH, 2 * PATCH]])
    red, blue = np.zeros((SIZE, SIZE, 3), np.uint8), np.zeros((SIZE, SIZE, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    kept, to_array = [], figures._figure_to_array
    monkeypatch.setattr(figures, "_figure_to_array", lambda fig: kept.append(fig) or to_array(fig))
    pixels = render_truth_vs_prediction(analysis, red[None], blue[None], PATCH)
    (fig,) = kept
    height = pixels.shape[0]
    centres = {}
    for axis in fig.axes:
        box = axis.get_window_extent()
        centres[axis.get_title()] = tuple(pixels[int(height - (box.y0 + box.y1) / 2), int((box.x0 + box.x1) / 2)])
    assert centres["Decoded: true features"] == (255, 0, 0)
    assert centres["Decoded: prediction"] == (0, 0, 255)
