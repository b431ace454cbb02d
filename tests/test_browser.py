"""The app in a real browser (Debian Chromium driven by Playwright): pick an example and run it, upload a photo,
draw a box on the annotator canvas, run it, and check the sketches render. Takes a screenshot of the page; with
UPDATE_SCREENSHOT=1 and the shipped bundle it becomes the README's docs/screenshot.png (otherwise the run leaves the
working tree as it was).

Runs the bundle in assets/ when it has a model, otherwise a tiny random bundle. Never calls `playwright install`:
it uses /usr/bin/chromium (apt-get install chromium).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from helpers import ASSETS, REPO, USE_ASSETS, serve_app, tiny_bundle
from ijepa.engine import DECODER_NAMES, MAX_NUM_SAMPLES
from ijepa.boxes import boxes_to_masks, map_boxes
from ijepa.inference import prepare_image

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium "
                       "(apt-get install chromium chromium-driver)"),
]

README_SCREENSHOT = REPO / "docs" / "screenshot.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 90_000
UPLOAD_SIZE = (400, 300)
UPLOAD_INPUT = f'input[data-testid="{app.UPLOAD_LABEL}-upload-button"]'  # the upload button's file input
DRAWN_BOX = (110, 0, 290, 180)  # in the uploaded photo's pixels, at its top edge: its number must stay in view


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return ASSETS if USE_ASSETS else tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("log") / "app.log"


@pytest.fixture(scope="module")
def server(assets, server_log):
    with serve_app(assets, server_log) as (url, _):
        yield url


@pytest.fixture(scope="module")
def playwright():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        yield playwright


def open_page(playwright, server, profile: Path, **device):
    """(A Chromium context with ``device``'s viewport and input, its page at the app with the widget drawn)."""
    context = playwright.chromium.launch_persistent_context(
        str(profile), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, **device)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server, wait_until="load")
    page.wait_for_selector("#annotator canvas.canvas-annotator")
    return context, page


@pytest.fixture(scope="module")
def page(playwright, server, tmp_path_factory):
    context, page = open_page(playwright, server, tmp_path_factory.mktemp("chromium-profile"),
                              viewport={"width": 1400, "height": 1000})
    yield page
    context.close()


def photo(tmp_path: Path) -> Path:
    pixels = np.zeros((UPLOAD_SIZE[1], UPLOAD_SIZE[0], 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, UPLOAD_SIZE[0], dtype=np.uint8)[None, :]
    pixels[100:200, 150:250] = (0, 200, 0)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def on_screen(canvas: dict, x: float, y: float) -> tuple[float, float]:
    """Where a point of the app's square canvas (``app.CANVAS_SIDE`` pixels) is in the viewport: the widget shows it
    as large as its drawing area (``canvas``, a bounding box) allows, centred there."""
    scale = min(canvas["width"], canvas["height"]) / app.CANVAS_SIDE
    return (canvas["x"] + (canvas["width"] - app.CANVAS_SIDE * scale) / 2 + x * scale,
            canvas["y"] + (canvas["height"] - app.CANVAS_SIDE * scale) / 2 + y * scale)


def run_and_wait_for_sketches(page, expected: int = 4, explanation: str = "") -> None:
    """Press the button, wait until the new run's explanation (containing ``explanation``) is shown, then until
    all its sketches have loaded."""
    page.click("#run")
    page.wait_for_function("(text) => { const e = document.querySelector('#explanation'); "
                           "return e && e.innerText.includes('What the model saw') && e.innerText.includes(text); }",
                           arg=explanation)
    page.wait_for_function(
        """(n) => {
            const status = document.querySelector('#sketch-status');
            const thumbs = [...document.querySelectorAll('#sketches .thumbnail-small img')];
            const shown = document.querySelector('#sketches .media-button img');
            return status && status.innerText.startsWith(n + ' of ' + n + ' sketches') && thumbs.length === n
                && [shown, ...thumbs].every(i => i && i.complete && i.naturalWidth > 0);
        }""", arg=expected)


def test_pick_an_example_then_upload_and_draw_a_box(page, assets, tmp_path):
    examples = json.loads((assets / "examples" / "examples.json").read_text())
    thumbnails = page.locator("#examples button.thumbnail-item")
    assert thumbnails.count() == len(examples) >= 1
    # every example is in view with its caption at once: none hidden below the gallery's edge behind a scrollbar
    gallery = page.locator("#examples").bounding_box()
    for k in range(len(examples)):
        item = thumbnails.nth(k).bounding_box()
        assert gallery["y"] <= item["y"] and item["y"] + item["height"] <= gallery["y"] + gallery["height"], k
    assert thumbnails.nth(0).inner_text().strip() == examples[0]["caption"]
    thumbnails.nth(len(examples) - 1).click()
    example_boxes = len(examples[-1]["boxes"])
    time.sleep(1.0)  # the annotator redraws from the new value
    assert "selected" in thumbnails.nth(len(examples) - 1).get_attribute("class")  # until an upload (below)
    run_and_wait_for_sketches(page)
    assert f"Box {example_boxes}: error" in page.inner_text("#explanation")
    for tab, selector in [("Surprise", "#surprise img"), ("Features", "#features img"),
                          ("Truth vs prediction", "#truth img"), ("Sketches", "#sketches img")]:
        page.get_by_role("tab", name=tab).click()
        page.wait_for_selector(selector)  # each panel rendered (the surprise map follows the sketches)
    page.wait_for_selector("#model-view img")
    # a window typed into the slider's field (Enter) redraws the surprise map, as dragging the slider does
    page.get_by_role("tab", name="Surprise").click()
    before = page.get_attribute("#surprise img", "src")
    field = page.locator('#window input[type="number"]')
    field.fill("3")
    field.press("Enter")
    page.wait_for_function("(old) => { const i = document.querySelector('#surprise img'); "
                           "return i && i.getAttribute('src') !== old && i.complete; }", arg=before)
    page.get_by_role("tab", name="Sketches").click()
    update = os.environ.get("UPDATE_SCREENSHOT") == "1" and USE_ASSETS  # never a random bundle's page in the README
    screenshot = README_SCREENSHOT if update else tmp_path / "screenshot.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert Image.open(screenshot).size[0] >= 1000  # the whole page, not an empty capture

    picked = "items => items.filter(i => i.classList.contains('selected')).length"
    not_an_image = tmp_path / "not-an-image.png"
    not_an_image.write_bytes(b"\x89PNG but not really")
    page.set_input_files(UPLOAD_INPUT, str(not_an_image))
    page.wait_for_selector("text=not an image")
    time.sleep(1.0)
    assert thumbnails.evaluate_all(picked) == 1  # refused: nothing changes, the example stays highlighted
    page.set_input_files(UPLOAD_INPUT, str(photo(tmp_path)))
    page.wait_for_selector("text=Image loaded.")
    time.sleep(1.0)
    assert thumbnails.evaluate_all(picked) == 0
    annotator = page.locator("#annotator canvas.canvas-annotator")
    canvas = annotator.bounding_box()
    # the box goes where app.canvas_boxes puts it on the app's canvas
    (x0, y0, x1, y1), = app.canvas_boxes([DRAWN_BOX], *UPLOAD_SIZE)
    start, end = on_screen(canvas, x0, y0), on_screen(canvas, x1, y1)
    # no press on the box icon: after an upload the widget is already drawing boxes
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=12)
    page.mouse.up()
    run_and_wait_for_sketches(page)
    # the run numbered the box; the widget writes "1" on a white label just above it, on the canvas
    shot = tmp_path / "canvas.png"
    annotator.screenshot(path=str(shot))
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    ratio = pixels.shape[1] / canvas["width"]  # screenshot pixels per CSS pixel
    box_left, box_top = round((start[0] - canvas["x"]) * ratio), round((start[1] - canvas["y"]) * ratio)
    label = pixels[box_top - round(17 * ratio):box_top - round(3 * ratio), box_left + 1:box_left + round(14 * ratio)]
    assert box_top >= round(20 * ratio) and (label.min(axis=2) > 230).mean() > 0.5, "the box's number is out of view"

    config = json.loads((assets / "model" / "config.json").read_text())
    prepared = prepare_image(Image.new("RGB", UPLOAD_SIZE), config["img_size"])
    grid = config["img_size"] // config["patch_size"]
    model_box = map_boxes(prepared, [DRAWN_BOX], config["patch_size"])
    _, (targets,) = boxes_to_masks(model_box, (config["img_size"],) * 2, grid)
    explanation = page.inner_text("#explanation")
    assert f"The {targets.numel()} patches under your box were hidden" in explanation  # the drawn box, mapped
    assert "Box 2" not in explanation  # the upload cleared the example's boxes

    page.get_by_label(DECODER_NAMES["pooled"]).check()  # the paper's decoder draws the same box
    run_and_wait_for_sketches(page, explanation="gets only the average")


def test_a_new_image_while_sketches_stream_clears_the_panels_without_an_error(page, server_log):
    """Picking another example while the last one's sketches are still being drawn stops that run (the page sends
    the shown image's token with the run): the panels stay cleared, none is marked "Error" (Gradio's cancels= did
    that now and then), and the next run goes ahead. Run was pressed twice: Gradio holds the second press and sends
    it when the first run ends, with the page's values of then; it must not run the new image unasked."""
    thumbnails = page.locator("#examples button.thumbnail-item")
    thumbnails.nth(0).click()
    time.sleep(1.0)
    samples = page.locator('#num-samples input[type="number"]')
    samples.fill(str(MAX_NUM_SAMPLES))
    samples.press("Enter")
    page.get_by_text("Settings").click()
    steps = page.get_by_label("number input for Decoder steps (more = finer)")
    steps.fill("30")
    steps.press("Enter")
    page.click("#run")
    page.wait_for_function("() => (document.querySelector('#sketch-status') || {}).innerText?.includes('drawing')")
    stopped = "A run stopped: its page shows another image now."
    stopped_before = server_log.read_text().count(stopped)  # example 0 may have stopped the last test's run
    page.click("#run")  # held: trigger_mode="always_last"
    thumbnails.nth(1).click()
    time.sleep(8.0)  # what the stopped run would have sent by now
    assert page.inner_text("#sketch-status").strip() == ""
    assert page.inner_text("#explanation").strip() == "Results appear here."
    errors = page.evaluate("() => [...document.querySelectorAll('.error')].filter(e => e.offsetParent)"
                           ".map(e => e.innerText)")
    assert errors == []
    assert server_log.read_text().count(stopped) == stopped_before + 2  # the run, then the press held for it
    # a press held while the same image's run goes on does run, after it
    status = "(document.querySelector('#sketch-status') || {}).innerText || ''"
    page.click("#run")
    page.wait_for_function(f"() => ({status}).includes('drawing')")
    page.click("#run")
    page.wait_for_function(f"() => ({status}).startsWith('{MAX_NUM_SAMPLES} of {MAX_NUM_SAMPLES} sketches')")
    page.wait_for_function(f"() => ({status}).includes('drawing')", timeout=60_000)  # the held press
    page.wait_for_function(f"() => ({status}).startsWith('{MAX_NUM_SAMPLES} of')", timeout=60_000)
    assert server_log.read_text().count(stopped) == stopped_before + 2
    samples.fill("2")
    samples.press("Enter")
    steps.fill("4")
    steps.press("Enter")
    run_and_wait_for_sketches(page, expected=2)


def touch_drag(page, start: tuple[float, float], end: tuple[float, float], steps: int = 12) -> None:
    """A finger dragged from ``start`` to ``end`` (CSS pixels in the viewport): real touch events, as a phone sends."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": start[0], "y": start[1]}]})
    for i in range(1, steps + 1):
        point = {"x": start[0] + (end[0] - start[0]) * i / steps, "y": start[1] + (end[1] - start[1]) * i / steps}
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [point]})
        time.sleep(0.02)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    cdp.detach()


def test_a_phone_draws_a_box_by_touch_and_is_shown_the_results(playwright, server, tmp_path):
    """On a phone the columns stack: the page fits the width, a first finger drag draws a box, the button brings
    the results into view as they arrive, and the explanation reads at the screen's width, not in a strip."""
    width, height = 390, 844
    context, page = open_page(playwright, server, tmp_path / "profile", viewport={"width": width, "height": height},
                              is_mobile=True, has_touch=True, device_scale_factor=2)
    try:
        assert page.evaluate("document.documentElement.scrollWidth") <= width  # no sideways scrolling
        page.wait_for_selector('#annotator button[aria-label="Create box"].selected')  # the page opens drawing boxes
        page.locator("#annotator canvas.canvas-annotator").scroll_into_view_if_needed()
        canvas = page.locator("#annotator canvas.canvas-annotator").bounding_box()
        side = app.CANVAS_SIDE
        # the example's box is at the top: a second one lower down, drawn without pressing any icon first
        touch_drag(page, on_screen(canvas, 0.3 * side, 0.62 * side), on_screen(canvas, 0.62 * side, 0.84 * side))
        time.sleep(1.0)  # the widget sends its new value
        page.locator("#run").tap()
        page.wait_for_function("() => { const e = document.querySelector('#explanation'); "
                               "return e && e.innerText.includes('Box 2: error'); }")
        page.wait_for_function("() => /sketches in/.test(document.querySelector('#sketch-status').innerText)")
        time.sleep(1.0)  # the smooth scroll settles
        results = page.locator("#results").bounding_box()  # viewport coordinates
        assert -2 <= results["y"] <= height / 4, "the results were not brought into view"
        assert page.locator("#explanation").bounding_box()["width"] >= 0.8 * (width - 16)
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        # every result tab's name is on screen (in two rows), none hidden behind a menu
        for tab in ("Sketches", "Truth vs prediction", "What it expects", "Surprise", "Features"):
            assert page.get_by_role("tab", name=tab).is_visible(), tab
        # an example tapped below the drawing area: the new image comes into view
        example = page.locator("#examples button.thumbnail-item").nth(1)
        example.scroll_into_view_if_needed()
        example.tap()
        time.sleep(1.5)  # the smooth scroll settles
        assert -2 <= page.locator("#annotator").bounding_box()["y"] <= height / 4, "the new example is out of view"
        # an upload's message shows at the bottom, not over the top of the canvas where the next box is drawn
        page.set_input_files(UPLOAD_INPUT, str(photo(tmp_path)))
        page.wait_for_selector("text=Image loaded.")
        assert page.locator(".toast-wrap").bounding_box()["y"] > height / 2, "the message covers the canvas"
    finally:
        context.close()
