"""The app as programs and people meet it: `python app.py` serving the "/sketch" API to gradio_client, clear
messages for bad input (as AppError) with the server still answering afterwards, and the UI handlers.

The server runs the bundle in assets/ when it has a model, otherwise a tiny random bundle.
"""
from __future__ import annotations

import inspect
import io
import json
import os
import socket
import struct
import subprocess
import sys
import warnings

import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from helpers import ASSETS, REPO, USE_ASSETS, free_port, serve_app, tiny_bundle
from ijepa import panels
from ijepa.app_functions import AppFunctions
from ijepa.boxes import MAX_BOXES
from ijepa.engine import MAX_NUM_SAMPLES, Engine



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python app.py` in a subprocess on a free port; yields (url, seconds it took to answer)."""
    assets = ASSETS if USE_ASSETS else tiny_bundle(tmp_path_factory.mktemp("b"))
    with serve_app(assets, tmp_path_factory.mktemp("log") / "app.log") as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    return Client(server[0], verbose=False)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A 400x300 JPEG with a green square in the middle."""
    pixels = np.zeros((300, 400, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, 400, dtype=np.uint8)[None, :]
    pixels[100:200, 150:250] = (0, 200, 0)
    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    return path


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_server_starts_and_documents_only_the_sketch_endpoint(server, client):
    url, seconds = server
    print(f"app.py answered after {seconds:.1f} s")
    api = client.view_api(return_format="dict", print_info=False)
    assert list(api["named_endpoints"]) == ["/sketch"] and not api["unnamed_endpoints"]
    names = [p["parameter_name"] for p in api["named_endpoints"]["/sketch"]["parameters"]]
    assert names == ["image", "boxes", "num_samples", "seed", "decoder", "steps"]
    assert "I-JEPA" in httpx.get(url, timeout=10).text


def test_sketch_endpoint_returns_sketches_and_metrics(client, photo):
    sketches, metrics = client.predict(handle_file(str(photo)), "[[150, 100, 250, 200]]", 2, 5, api_name="/sketch")
    assert [item["caption"].split(" ·")[0] for item in sketches] == ["Sketch 1 of 2", "Sketch 2 of 2"]
    first = Image.open(sketches[0]["image"])
    assert first.format == "PNG" and first.size[0] > first.size[1] > 0
    (box,) = metrics["boxes"]
    assert box["box"] == [150, 100, 250, 200] and box["hidden_patches"] > 0
    assert box["prediction_error"] > 0 and len(box["error_per_patch"]) == box["hidden_patches"]
    assert metrics["image_size"] == [400, 300] and metrics["seed"] == 5 and metrics["num_samples"] == 2
    assert metrics["num_steps"] == 10 and sketches[0]["caption"].endswith("· 10 steps")
    if not USE_ASSETS or (ASSETS / "probe_subgroup.safetensors").is_file():
        assert len(box["probe"]["subgroup"]) == 5
    if not USE_ASSETS or (ASSETS / "bank.safetensors").is_file():
        assert len(box["neighbours"]) == 6
    # a script may send the seed as a string: the same sketches
    again, _ = client.predict(handle_file(str(photo)), "[[150, 100, 250, 200]]", 2, "5.0", api_name="/sketch")
    assert np.array_equal(np.asarray(Image.open(again[1]["image"])), np.asarray(Image.open(sketches[1]["image"])))
    fewer, metrics = client.predict(handle_file(str(photo)), "[[150, 100, 250, 200]]", 2, 5, steps=4,
                                    api_name="/sketch")
    assert metrics["num_steps"] == 4 and fewer[0]["caption"].endswith("· 4 steps")
    assert not np.array_equal(np.asarray(Image.open(fewer[1]["image"])), np.asarray(Image.open(sketches[1]["image"])))


def test_sketch_endpoint_draws_with_the_paper_decoder_when_asked(client, photo):
    ours, default = client.predict(handle_file(str(photo)), "[[150, 100, 250, 200]]", 1, 5, api_name="/sketch")
    paper, metrics = client.predict(handle_file(str(photo)), "[[150, 100, 250, 200]]", 1, 5, "pooled",
                                    api_name="/sketch")
    assert (default["decoder"], metrics["decoder"]) == ("spatial_context", "pooled")  # as the request names it
    assert metrics["decoder_path"].endswith("decoder_paper")
    assert not np.array_equal(np.asarray(Image.open(ours[0]["image"])), np.asarray(Image.open(paper[0]["image"])))
    with pytest.raises(AppError):
        client.predict(handle_file(str(photo)), "[[150, 100, 250, 200]]", 1, 5, "spatial", api_name="/sketch")


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def png_bytes(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name, data, boxes, extra, message", [
    ("notes.txt", b"not an image at all", "[[10, 10, 100, 100]]", {}, "not an image"),
    ("broken.png", png_bytes((300, 300))[:80], "[[10, 10, 100, 100]]", {}, "damaged"),
    ("bomb.png", png_header_only(100_000, 100_000), "[[10, 10, 100, 100]]", {}, "megapixels"),
    ("big.png", png_header_only(9_000, 8_000), "[[10, 10, 100, 100]]", {}, "limit"),
    ("ok.png", None, "[]", {}, "No box was given"),
    ("ok.png", None, "[[100, 100, 102, 103]]", {}, r"smaller than one patch.*pixels"),
    ("ok.png", None, "[[0, 0, 300, 300]]", {}, "no context"),
    ("ok.png", None, json.dumps([[0, 0, 100, 100]] * 5), {}, "at most 4"),
    ("ok.png", None, "[[-80, 0, -10, 100]]", {}, "outside the 300x300 image"),
    ("ok.png", None, "[[0, 400, 100, 9000]]", {}, "outside the 300x300 image"),
    ("ok.png", None, "[[0, 0, 100", {}, "JSON list"),
    ("ok.png", None, '{"xmin": 1}', {}, "JSON list"),
    ("ok.png", None, "[[10, 10, 150, 150]]", {"num_samples": 100}, "between 1 and 8"),
    ("ok.png", None, "[[10, 10, 150, 150]]", {"num_samples": 1.5}, "whole number"),
    ("ok.png", None, "[[10, 10, 150, 150]]", {"seed": None}, "Enter a seed"),
    ("ok.png", None, "[[10, 10, 150, 150]]", {"seed": "abc"}, r"Enter a seed as a whole number \(got abc\)"),
    ("ok.png", None, "[[10, 10, 150, 150]]", {"seed": 10 ** 400}, "Enter a seed as a whole number"),
    ("ok.png", None, "[[10, 10, 1" + "0" * 400 + ", 150]]", {}, "must hold four numbers"),
    ("ok.png", None, "[[10, 10, 1" + "0" * 5000 + ", 150]]", {}, "JSON list"),  # json's integer-length limit
    ("ok.png", None, "[" * 100_000 + "]" * 100_000, {}, "JSON list"),  # nesting past the recursion limit
    ("ok.png", None, "[[10, 10, 150, 150]]", {"steps": 0}, "sampler steps must be between 1"),
    ("ok.png", None, "[[10, 10, 150, 150]]", {"decoder": "bogus"}, r"No 'bogus' sketch decoder is loaded; choose one"),
])
def test_bad_input_gets_a_clear_message_and_the_server_keeps_serving(server, client, tmp_path, name, data, boxes,
                                                                     extra, message):
    path = write(tmp_path, name, png_bytes((300, 300)) if data is None else data)
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(str(path)), boxes, extra.get("num_samples", 1), extra.get("seed", 0),
                       steps=extra.get("steps", 10), decoder=extra.get("decoder", ""), api_name="/sketch")
    assert httpx.get(server[0], timeout=10).status_code == 200


def test_too_large_files_are_refused_before_processing(server, client, tmp_path, photo):
    big = write(tmp_path, "big.png", b"\0" * (21 * 1024 * 1024))
    with pytest.raises(ValueError, match="maximum file size"):  # the client checks the server's limit first
        client.predict(handle_file(str(big)), "[[1, 1, 50, 50]]", 1, 0, api_name="/sketch")
    with open(big, "rb") as f:  # and the server enforces it for anyone else
        response = httpx.post(server[0] + "gradio_api/upload", files={"files": ("big.png", f)}, timeout=60)
    assert response.status_code == 413
    sketches, _ = client.predict(handle_file(str(photo)), "[[150, 100, 250, 200]]", 1, 0, api_name="/sketch")
    assert len(sketches) == 1  # still serving


# ----- the UI handlers, in process ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app_module():
    sys.path.insert(0, str(REPO))
    import app

    return app


def handlers_for(app_module, bundle: Path, **load_kwargs):
    """The app's Handlers as main() builds them, on the CPU (no warm-up)."""
    return app_module.Handlers(AppFunctions(Engine.load(bundle, device="cpu", **load_kwargs)))


def test_the_ui_imports_no_model_code():
    """app.py is UI only: main() loads the models and hands their functions to the UI, so importing app.py (as a
    test, a notebook or another launcher does) loads neither torch nor any model module."""
    check = ("import sys, app; loaded = [m for m in ('torch', 'timm', 'diffusers', 'ijepa.engine', 'ijepa.model') "
             "if m in sys.modules]; assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_annotator_rotation_and_box_order(app_module):
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = 255  # white left half
    value = {"image": image, "orientation": 1,
             "boxes": [{"xmin": 2, "ymin": 30, "xmax": 10, "ymax": 38}, {"xmin": 5, "ymin": 2, "xmax": 15, "ymax": 9}]}
    upright, boxes = app_module.annotator_input(value)
    assert upright.shape == (40, 20, 3) and upright[5, 10, 0] == 255 and upright[35, 10, 0] == 0  # turned clockwise
    assert boxes == [[5, 2, 15, 9], [2, 30, 10, 38]]  # reading order, as the model view numbers them
    with pytest.raises(ValueError, match="upload an image"):
        app_module.annotator_input(None)


def test_ui_run_without_a_decoder_explains_how_to_train_one(app_module, tmp_path):
    engine = Engine.load(tiny_bundle(tmp_path / "b", with_decoder=False), device="cpu")
    handlers = app_module.Handlers(AppFunctions(engine))
    value, source = handlers.initial_value()
    assert len(value["boxes"]) == 2 and [b["label"] for b in value["boxes"]] == ["1", "2"]  # as the results number them
    (outputs,) = list(handlers.run(value, 4, 0, 4, None, source))
    view, explanation, sketches, status, truth, neighbours, readout, metrics, ran = outputs
    assert ran and sketches == [] and "python -m train.decoder --checkpoint" in status
    assert view.ndim == 3 and truth.ndim == 3 and len(neighbours) == 12 and "Box 2" in readout
    assert "What the model saw" in explanation and len(metrics["boxes"]) == 2
    widget, shown_source = handlers.renumbered(value, source)  # at the press, before the run (build_app)
    assert shown_source == source and [b["label"] for b in widget["boxes"]] == ["1", "2"]
    surprise, features = handlers.explore(value, 2, source)
    assert surprise.ndim == 3 and features.ndim == 3
    # input to change is said in the explanation panel (and a warning), not as an error over every panel
    with pytest.warns(UserWarning, match="Draw a box"):  # gr.Warning outside a request
        (outputs,) = list(handlers.run({**value, "boxes": []}, 4, 0, 4, None, source))
    assert "Please adjust the input" in outputs[1] and "Draw a box" in outputs[1]
    # the last run's results stay: a slip (no box, a box too many) must not throw them away
    assert outputs[0] == outputs[2] == outputs[7] == app_module.gr.skip() and "from the last run" in outputs[1]
    # the maps do not follow a run stopped at its input checks: its message stands alone, and no work is spent
    assert outputs[-1] is False
    assert handlers.explore_after_run(value, 2, source, outputs[-1]) == (app_module.gr.skip(), app_module.gr.skip())
    assert handlers.explore_after_run(value, 2, source, True)[0].ndim == 3


def test_ui_run_streams_sketches(app_module, tmp_path):
    engine = Engine.load(tiny_bundle(tmp_path / "b"), device="cpu")
    handlers = app_module.Handlers(AppFunctions(engine))
    value, source = handlers.initial_value()
    outputs = list(handlers.run(value, 3, 1, 2, None, source))
    counts = [len(o[2]) for o in outputs]
    assert counts == [0, 1, 3, 3]  # nothing yet, the first sketch, all sketches, then the truth panel
    assert outputs[1][4] is None and outputs[-1][4].ndim == 3 and outputs[-1][7]["seed"] == 1
    assert outputs[-1][7]["decoder"] == "spatial_context" and outputs[-1][7]["decoder_path"].endswith("decoder")
    paper = list(handlers.run(value, 1, 1, 2, "pooled", source))
    assert paper[-1][7]["decoder"] == "pooled" and "average of the box" in paper[-1][1]
    assert not np.array_equal(paper[-1][2][0][0], outputs[-1][2][0][0])


def test_the_truth_panel_is_drawn_with_the_decoder_and_seed_the_user_chose(app_module, tmp_path, monkeypatch):
    """Truth vs prediction must use the chosen decoder and seed, or its prediction is not the sketch 1 beside it."""
    engine = Engine.load(tiny_bundle(tmp_path / "b"), device="cpu")
    handlers = app_module.Handlers(AppFunctions(engine))
    value, source = handlers.initial_value()
    calls, drawn, original = [], [], engine.truth_vs_prediction
    signature = inspect.signature(original)

    def spy(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        calls.append((engine.conditioning_of(arguments.get("conditioning")), arguments.get("seed")))
        drawn.append(original(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(engine, "truth_vs_prediction", spy)
    updates = list(handlers.run(value, 1, 7, 1, "pooled", source))  # value, sketches, seed, steps, decoder, source
    assert calls == [("pooled", 7)]
    # each figure reaches its own panel: the run's outputs are wired (build_app) in the order its updates come
    final = updates[-1]
    assert final[4] is drawn[0]
    image, boxes, _ = handlers.model_input(value, source)
    assert np.array_equal(final[0], panels.model_view(engine.analyze(image, boxes)))
    demo = app_module.build_app(handlers)
    run = next(d for d in demo.config["dependencies"] if d["api_name"] == "run")
    ids = {block._id: getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert [ids[i] for i in run["outputs"]][:8] == ["model-view", "explanation", "sketches", "sketch-status", "truth",
                                                    "neighbours", "readout", "metrics"]


def test_the_app_accepts_as_many_boxes_as_it_promises_and_no_more(app_module):
    """The intro says at most MAX_BOXES boxes: drawing exactly that many must run, one more must be refused."""
    box = [0, 0, 10, 10]
    app_module.check_drawn([box] * MAX_BOXES, MAX_BOXES)
    with pytest.raises(app_module.InputError, match=f"at most {MAX_BOXES}"):
        app_module.check_drawn([box] * (MAX_BOXES + 1), MAX_BOXES)


def test_command_line_flags_reach_the_engine(app_module, tmp_path, monkeypatch, capsys):
    """`python app.py --assets/--checkpoint/--decoder (twice)/--device/--precision` must load what was asked for."""
    calls = []

    def load(*args, **kwargs):
        calls.append((args, kwargs))
        raise ValueError("recorded")

    monkeypatch.setattr(Engine, "load", load)
    argv = ["--assets", str(tmp_path / "a"), "--checkpoint", str(tmp_path / "c"), "--decoder", str(tmp_path / "d1"),
            "--decoder", str(tmp_path / "d2"), "--device", "cpu", "--precision", "fp32", "--port", str(free_port())]
    assert app_module.main(argv) == 2 and "error: recorded" in capsys.readouterr().err
    assert calls == [((tmp_path / "a",), {"checkpoint": tmp_path / "c", "decoder": [tmp_path / "d1", tmp_path / "d2"],
                                          "device": "cpu", "precision": "fp32"})]


def test_a_failure_while_warming_up_is_a_bug_with_its_traceback_not_a_setting_to_change(app_module, monkeypatch,
                                                                                        capsys):
    """Only loading errors say "error: ..." and exit 2; warming up runs the models, and its failure is a bug."""
    import ijepa.app_functions

    class Loaded:
        def warm_up(self):
            raise ValueError("shapes [3, 4] and [5] do not match")

    monkeypatch.setattr(ijepa.app_functions, "load_app_functions", lambda *args, **kwargs: Loaded())
    with pytest.raises(ValueError, match="do not match"):
        app_module.main(["--port", str(free_port())])
    assert "error:" not in capsys.readouterr().err


def test_missing_bundle_exits_with_a_clear_message(app_module, tmp_path, capsys):
    assert app_module.main(["--assets", str(tmp_path / "nothing"), "--port", str(free_port())]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_a_port_in_use_or_out_of_range_is_refused_before_the_models_load(app_module, monkeypatch, capsys):
    """Gradio's traceback came after loading and warming up the models; --port 70000 gave an OverflowError."""
    monkeypatch.setattr(Engine, "load", lambda *a, **k: pytest.fail("the models were loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert app_module.main(["--port", str(port)]) == 2
    assert f"error: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    for port in ("70000", "-1", "0"):
        with pytest.raises(SystemExit) as stop:
            app_module.main(["--port", port])
        assert stop.value.code == 2 and "--port must be between 1 and 65535" in capsys.readouterr().err


def test_the_widget_shows_exact_pixels_and_a_new_image_clears_the_last_results(app_module, tmp_path):
    """The drawing widget stores what it is given and sends that back to the model: a PNG, not a lossy WebP (an
    array would be saved as WebP, which changed pixels by up to 212 of 255 here). Picking another image empties
    every result panel, so no panel shows the last image's results beside the new one."""
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    widget = app_module.image_annotator(image_type="numpy", image_mode="RGB")
    value = app_module.annotator_value(image, [[1, 2, 30, 40]], ((255, 0, 0),))
    back = widget.preprocess(widget.postprocess({**value, "boxes": []}))
    assert np.array_equal(back["image"], image)
    upright, boxes = app_module.annotator_input(value)  # our own value, before the widget: the same pixels
    assert np.array_equal(upright, image) and boxes == [[1, 2, 30, 40]]

    handlers = handlers_for(app_module, tiny_bundle(tmp_path / "b"))
    chosen = handlers.load_example(app_module.gr.SelectData(None, {"index": 1, "value": None}))
    example = handlers.examples[1]
    read, boxes, _ = handlers.model_input(*chosen[:2])  # the model reads the example's file, not the display copy
    assert np.array_equal(read, example.image()) and np.allclose(boxes, example.boxes)
    assert chosen[2:-2] == app_module.Handlers.CLEARED and len(chosen) == 14  # widget, its source, ten result panels
    assert chosen[-2] is True  # and a new image, whose panels are cleared again behind the last image's work
    photo = tmp_path / "photo.png"
    Image.fromarray(image).save(photo)
    uploaded = handlers.load_upload(str(photo))
    assert np.array_equal(handlers.model_input(*uploaded[:2])[0], image) and uploaded[2:-3] == handlers.CLEARED
    assert uploaded[-1].selected_index is None  # no example highlighted beside the photo


def test_any_image_is_shown_whole_and_boxes_map_back_to_the_file(app_module, tmp_path):
    """A 20 px icon is enlarged and a tall photo reduced to fit the drawing area's square canvas (both whole, the
    button in view, the drawing area the same size for both and after any turn), with room above the image for the
    number the widget writes above a box; boxes drawn there, also after a turn, reach the model in the file's pixels.
    Odd sizes (7 x 5, 401 x 300) need the image's shown sides rounded to keep it exactly centred, and the lit square
    is the file's centre square scaled (7 x 5: file pixels 1-5, not the shown copy's own centre, half a pixel off)."""
    handlers = handlers_for(app_module, tiny_bundle(tmp_path / "b"))
    side, margin = app_module.CANVAS_SIDE, app_module.LABEL_MARGIN
    for size in ((20, 10), (300, 900), (7, 5), (401, 300)):
        file = tmp_path / f"{size[0]}x{size[1]}.png"
        pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(file)
        value, source = handlers.load_upload(str(file))[:2]
        shown, _ = app_module.annotator_input(value)
        left, top, width, height = app_module.placement(*size)
        assert shown.shape == (side, side, 3) and max(width, height) == side - 2 * margin and min(left, top) >= margin
        assert image_bounds(shown, app_module.CANVAS_FILL) == (left, top, width, height)
        enlarged = width >= size[0] and height >= size[1]
        resample = Image.Resampling.NEAREST if enlarged else Image.Resampling.LANCZOS
        copy = np.asarray(Image.fromarray(pixels).resize((width, height), resample))
        # shown as it is in the centre square the model reads, dimmed around it
        file_side = min(size)
        file_x, file_y = (size[0] - file_side) // 2, (size[1] - file_side) // 2
        x0, x1 = round(file_x * width / size[0]), round((file_x + file_side) * width / size[0])
        y0, y1 = round(file_y * height / size[1]), round((file_y + file_side) * height / size[1])
        lit = shown[top:top + height, left:left + width] == copy
        rows, cols = np.nonzero(lit.all(-1))
        assert lit[y0:y1, x0:x1].all() and (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (y0, y1, x0, x1)
        assert shown[top:top + height, left:left + width].mean() < copy.mean()
        for turns in range(4):  # the widget turned clockwise: its canvas, its boxes and the image inside it turn
            upright = np.rot90(pixels, k=-turns)
            left, top, width, height = app_module.placement(upright.shape[1], upright.shape[0])
            assert image_bounds(np.rot90(shown, k=-turns), app_module.CANVAS_FILL) == (left, top, width, height)
            box = {"xmin": left, "ymin": top, "xmax": left + width / 2, "ymax": top + height / 4}
            read, boxes, now = handlers.model_input({**value, "boxes": [box], "orientation": turns}, source)
            assert np.array_equal(read, upright) and now["turns"] == turns
            assert np.allclose(boxes, [[0, 0, upright.shape[1] / 2, upright.shape[0] / 4]], atol=1e-6)
        border = {"xmin": 1, "ymin": 1, "xmax": margin - 1, "ymax": margin - 1}  # on the grey border only
        with pytest.raises(app_module.InputError, match="Box 1 lies on the grey border"):
            handlers.model_input({**value, "boxes": [border]}, source)
        # the message's number is on the canvas: the boxes are numbered even though the run stops there
        drawn = {"xmin": left + 2, "ymin": top + 2, "xmax": left + width / 2, "ymax": top + height / 2}
        with warnings.catch_warnings(record=True):  # gr.Warning outside a request
            *_, message, _, _, _, _, _, _, passed = list(handlers.run({**value, "boxes": [drawn, border]}, 1, 0, 4,
                                                                       None, source))[-1]
        widget = handlers.renumbered({**value, "boxes": [drawn, border]}, source)[0]
        assert "Box 1 lies on the grey border" in message and passed is False
        assert [(b["label"], round(b["xmin"])) for b in widget["boxes"]] == [("1", 1), ("2", round(drawn["xmin"]))]
        with warnings.catch_warnings():  # the maps are of the whole image: a box there is no concern of theirs
            warnings.simplefilter("error")
            assert all(m.ndim == 3 for m in handlers.explore({**value, "boxes": [border]}, 1, source))


def test_a_slider_value_typed_out_of_range_is_read_as_the_nearest_end(app_module, tmp_path):
    """Gradio's own check raised before the handler and marked every output failed (the surprise map became an
    error badge); the seed field is not rounded behind the user's back (2.5 ran as seed 2)."""
    demo = app_module.build_app(handlers_for(app_module, tiny_bundle(tmp_path / "b")))
    fields = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    window = fields["window"]
    assert [window.preprocess(v) for v in (9, 0, window.maximum)] == [window.maximum, 1, window.maximum]
    assert fields["num-samples"].preprocess(20) == MAX_NUM_SAMPLES
    with pytest.raises(app_module.InputError, match=r"Enter a seed as a whole number \(got 2.5\)"):
        app_module.whole_number(fields["seed"].preprocess(2.5), "a seed")
    for typed, shown in ((1e30, "1e\\+30"), ("99999999999999999999999", "1e\\+23"), (-2**31, "-2.14748e\\+09")):
        with pytest.raises(app_module.InputError, match=rf"Enter a seed as a whole number: {shown} is far too large"):
            app_module.whole_number(typed, "a seed")  # was "got 1000000000000000019884624838656", never typed
    assert app_module.whole_number(2**31 - 1, "a seed") == 2**31 - 1


def test_a_panorama_is_loaded_with_a_warning_that_the_model_reads_a_small_square(app_module, tmp_path):
    """An 8000x200 panorama's centre square is a sliver of the canvas, too small to draw a box in: say so at once."""
    handlers = handlers_for(app_module, tiny_bundle(tmp_path / "b"))
    for size, warned in (((800, 20), True), ((20, 800), True), ((400, 100), False), ((400, 300), False)):
        file = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.new("RGB", size, (20, 120, 200)).save(file)
        with warnings.catch_warnings(record=True) as caught:  # gr.Warning outside a request
            warnings.simplefilter("always")
            value, source = handlers.load_upload(str(file))[:2]
        assert any("Crop the image" in str(w.message) for w in caught) == warned, size
        assert source["path"] == str(file)  # loaded all the same: the model can read it


def image_bounds(canvas: np.ndarray, fill: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """(left, top, width, height) of what on a canvas is not its fill colour."""
    rows, cols = np.nonzero((canvas != fill).any(axis=2))
    return int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)


def test_the_ui_and_the_endpoint_draw_the_same_sketches_for_the_same_seed_and_steps(app_module, tmp_path):
    """In bf16 a sketch drawn alone and one drawn in a batch differed in thousands of pixel values on the shipped
    model, so the endpoint could not reproduce what the UI showed; both now draw their sketches the same way."""
    bundle = ASSETS if USE_ASSETS else tiny_bundle(tmp_path / "b")
    handlers = handlers_for(app_module, bundle, precision="bf16")
    value, source = handlers.initial_value()
    *_, last = handlers.run(value, 3, 4, 6, None, source)
    _, boxes, _ = handlers.model_input(value, source)
    api, metrics = handlers.api_sketch(source["path"], json.dumps(boxes), 3, 4, None, 6)
    assert last[7]["num_steps"] == metrics["num_steps"] == 6 and last[7]["image_size"] == metrics["image_size"]
    for (ui_sheet, ui_caption), (api_sheet, api_caption) in zip(last[2], api, strict=True):
        assert ui_caption == api_caption and np.array_equal(ui_sheet, api_sheet)


def test_a_bug_is_reported_as_one_and_logged_not_blamed_on_the_input(app_module, tmp_path, monkeypatch, caplog):
    handlers = handlers_for(app_module, tiny_bundle(tmp_path / "b"))
    value, source = handlers.initial_value()

    def broken(*args, **kwargs):
        raise ValueError("shapes [3, 4] and [5] do not match")

    monkeypatch.setattr(handlers.functions.engine, "analyze", broken)
    with pytest.raises(app_module.gr.Error) as caught:
        list(handlers.run(value, 1, 0, 4, None, source))
    assert caught.value.title == "Something went wrong" and "bug in the app, not a problem with your input" in str(
        caught.value) and "do not match" in str(caught.value)
    assert any(r.exc_info and "do not match" in str(r.exc_info[1]) for r in caplog.records)  # the traceback is logged
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="Draw a box"):  # input the user can fix
        (outputs,) = list(handlers.run({**value, "boxes": []}, 1, 0, 4, None, source))
    assert outputs[1].startswith("**Please adjust the input.**")


def test_a_box_the_model_cannot_use_is_named_before_the_number_fields(app_module, tmp_path):
    """With a box outside what the model sees and a seed of 2.5, the message is about the box: it says which one."""
    handlers = handlers_for(app_module, tiny_bundle(tmp_path / "b"))
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((32, 96, 3), 200, np.uint8)).save(wide)
    value, source = handlers.show(str(wide), [[2, 2, 20, 20]])  # in the dimmed left third
    with pytest.warns(UserWarning, match="Box 1 lies outside the centre square"):
        (outputs,) = list(handlers.run(value, 1, 2.5, 4, None, source))
    assert "Box 1" in outputs[1] and "whole number" not in outputs[1]


def test_a_file_that_is_not_an_image_changes_nothing(app_module, tmp_path):
    """An unreadable upload had blanked the widget and marked every panel "Error"; now it warns and the last image,
    its boxes and its results stay."""
    handlers = handlers_for(app_module, tiny_bundle(tmp_path / "b"))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    for path in (str(corrupt), None):
        with pytest.warns(UserWarning, match="not an image|No file arrived"):
            outputs = handlers.load_upload(path)
        assert len(outputs) == 15 and all(o == app_module.gr.skip() for o in outputs)  # nothing on the page changes
        # nor later: the clearing queued behind the model work finds no new image (its results must stay)
        assert all(o == app_module.gr.skip() for o in handlers.clear_results(False))


def test_a_new_image_stops_the_last_images_work(app_module, tmp_path):
    """Sketches still being drawn for the last image must not land beside a newly picked, uploaded or turned one: the
    run stops within a sampler step (the new image's work waits for it) and the maps change nothing. Gradio's
    cancels= did this, and left a red "Error" on the panels now and then, though nothing had failed, so the page
    sends the shown image's token with each event."""
    handlers = handlers_for(app_module, tiny_bundle(tmp_path / "b"))
    demo = app_module.build_app(handlers)
    dependencies = demo.config["dependencies"]
    assert not any(d["cancels"] for d in dependencies)
    ids = {block._id: block for block in demo.blocks.values()}
    ids_of = {getattr(block, "elem_id", None): i for i, block in ids.items()}
    token_box = {d["outputs"][-1] for d in dependencies if demo.fns[d["id"]].name in ("load_example", "cleared")}
    (token_box,) = token_box
    (upload,) = [d for d in dependencies if demo.fns[d["id"]].name == "load_upload"]
    assert upload["outputs"][-2:] == [token_box, ids_of["examples"]]  # and the examples, none highlighted
    assert isinstance(ids[token_box], app_module.gr.Textbox) and not ids[token_box].stateful  # sent with the event
    for fn in ("explore", "explore_after_run"):
        (work,) = [d for d in dependencies if demo.fns[d["id"]].name == fn]
        assert work["inputs"][-1] == token_box, fn
    # the run gets the token as the page holds it when the run is sent, and which image the press was made for
    (run_work,) = [d for d in dependencies if demo.fns[d["id"]].name == "run"]
    assert run_work["inputs"][-2] == token_box
    (pressed,) = [d for d in dependencies if d["js"] and d["targets"] == run_work["targets"] and d["outputs"]]
    assert pressed["inputs"] == [] and pressed["outputs"] == [run_work["inputs"][-1]]
    assert pressed["id"] < run_work["id"] and not pressed["queue"]  # copied at the press, before the run is sent

    value, source = handlers.initial_value()
    page, other_page = app_module.gr.Request(session_hash="page"), app_module.gr.Request(session_hash="other")
    token = handlers.load_example(app_module.gr.SelectData(None, {"index": 0, "value": None}), page)[-1]
    run = handlers.run(value, 3, 0, 2, None, source, token, request=page)
    first = next(run)
    assert first[-1] is True and first[3] == "Drawing sketches…"
    handlers.load_example(app_module.gr.SelectData(None, {"index": 1, "value": None}), other_page)  # another page
    assert next(run)[2]  # a sketch: this page still shows the image
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(photo)
    new_token = handlers.load_upload(str(photo), page)[-2]
    stopped = list(run)
    assert stopped == [(*(app_module.gr.skip(),) * 8, False)]  # nothing shown, and no maps after it
    # an image shown in the middle of a batch stops it at the next sampler step, not at the end of the batch
    steps_run = []

    def sampler_step(*_):
        steps_run.append(1)
        if len(steps_run) == 13:  # the third step of the batch of the other two sketches
            handlers.load_example(app_module.gr.SelectData(None, {"index": 1, "value": None}), page)

    engine = handlers.functions.engine
    hook = engine.samplers[engine.conditionings[0]].decoder.register_forward_hook(sampler_step)
    try:
        run = handlers.run(value, 3, 0, 10, None, source, new_token, request=page)
        assert next(run)[3] == "Drawing sketches…" and next(run)[2]  # the first sketch: 10 steps
        assert list(run) == stopped and len(steps_run) == 13  # no step after the one the image changed in
    finally:
        hook.remove()
    new_token = handlers.load_upload(str(photo), page)[-2]
    assert handlers.explore(value, 2, source, token, page) == (app_module.gr.skip(),) * 2
    assert handlers.explore_after_run(value, 2, source, True, token, page) == (app_module.gr.skip(),) * 2
    # a run pressed before the upload but started after it (it waited in the queue) shows nothing either
    assert list(handlers.run(value, 1, 0, 2, None, source, token, request=page)) == stopped
    # so does a press made for the last image and held while its run went on, then sent with the new image
    earlier = app_module.PRESSED_EARLIER
    assert list(handlers.run(value, 1, 0, 2, None, source, new_token, pressed_for=earlier, request=page)) == stopped
    # before its input checks: the new image's missing boxes are no concern of a press made for the last one
    assert list(handlers.run({**value, "boxes": []}, 1, 0, 2, None, source, new_token, pressed_for=earlier,
                             request=page)) == stopped
    # the new image's own work goes ahead; a turn gives the image a new token
    assert next(handlers.run(value, 1, 0, 2, None, source, new_token, app_module.PRESSED_SHOWN,
                             request=page))[-1] is True
    assert next(handlers.run(value, 1, 0, 2, None, source, new_token, request=page))[-1] is True
    *_, turned_token = handlers.cleared(page)
    assert list(handlers.run(value, 1, 0, 2, None, source, new_token, request=page)) == stopped
    assert all(m is not app_module.gr.skip() for m in handlers.explore(value, 2, source, turned_token, page))
    handlers.forget(page)  # a closed page's token goes
    assert handlers._shown == {"other": handlers._shown["other"]}


def test_the_api_page_suggests_an_image_and_boxes(app_module, tmp_path):
    """The "Use via API" snippet is copied as it is: gr.File and gr.Textbox would suggest a PDF and "Hello!!"."""
    demo = app_module.build_app(handlers_for(app_module, tiny_bundle(tmp_path / "b")))
    parameters = demo.get_api_info()["named_endpoints"]["/sketch"]["parameters"]
    examples = {p["parameter_name"]: p["example_input"] for p in parameters}
    assert examples["image"]["path"].endswith(".png")
    (box,) = json.loads(examples["boxes"])
    assert len(box) == 4 and box[0] < box[2] and box[1] < box[3]
    assert not list(REPO.glob("*.pyi"))  # subclassing a Gradio component would make Gradio write app.pyi


SERVED_FILES_CHECK = """
import json, sys, time
from pathlib import Path
import app as app_module
from gradio_client import Client, handle_file
from helpers import free_port, tiny_bundle
from ijepa.app_functions import AppFunctions
from ijepa.engine import Engine

engine = Engine.load(tiny_bundle(Path(sys.argv[1])), device="cpu")
demo = app_module.build_app(app_module.Handlers(AppFunctions(engine)), delete_cache=(1, 2))  # every 1 s, 2 s old
port = free_port()
demo.launch(server_port=port, prevent_thread_lock=True, quiet=True)
Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
    handle_file(str(engine.examples[0].path)), "[[40, 40, 200, 200]]", 1, 0, api_name="/sketch")
kept = {f for block in demo.blocks.values() for f in getattr(block, "keep_in_cache", set())}
served = {f for files in demo.temp_file_sets for f in files} - kept
report = {"served": len(served), "kept": len(kept), "all there": all(Path(f).exists() for f in served | kept)}
deadline = time.monotonic() + 30
while any(Path(f).exists() for f in served) and time.monotonic() < deadline:
    time.sleep(0.5)
report.update({"served left": sum(Path(f).exists() for f in served), "kept left": sum(Path(f).exists() for f in kept)})
print(json.dumps(report))
demo.close()
"""


def test_files_served_for_a_request_are_deleted_once_old_and_the_pages_own_are_kept(app_module, tmp_path):
    """Gradio kept every upload and output file until the server stopped: ~1 MB per run with several users, so a
    demo left running filled its disk (review). The app deletes old ones on a schedule (CACHE_CLEANUP: hourly, a day
    old). Run in a process of its own, which Gradio's in-process server leaves sockets behind in."""
    assert app_module.CACHE_CLEANUP == (3600, 24 * 3600)
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    done = subprocess.run([sys.executable, "-c", SERVED_FILES_CHECK, str(tmp_path / "b")], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert report["served"] and report["kept"] and report["all there"]
    assert report["served left"] == 0  # the request's files are gone
    assert report["kept left"] == report["kept"]  # the examples and the first image still load


def test_a_new_images_panels_are_cleared_again_after_the_last_images_work(app_module, tmp_path):
    """A run stopped by a new image could already have sent an update, landing after the clearing the new image
    made at once: the last image's sketches beside the new one, stuck at "drawing". A second clearing queues behind
    the model work, so it comes after anything that work sent."""
    handlers = handlers_for(app_module, tiny_bundle(tmp_path / "b"))
    demo = app_module.build_app(handlers)
    dependencies = demo.config["dependencies"]
    run = next(d for d in dependencies if d["api_name"] == "run")
    ids = {block._id: getattr(block, "elem_id", None) for block in demo.blocks.values()}
    for loader in ("load_example", "load_upload"):
        (load,) = [d for d in dependencies if demo.fns[d["id"]].name == loader]
        (clear,) = [d for d in dependencies if demo.fns[d["id"]].name == "clear_results"
                    and d["trigger_after"] == load["id"]]
        assert demo.fns[clear["id"]].concurrency_id == demo.fns[run["id"]].concurrency_id == "model"
        assert set(run["outputs"][:8]) <= set(clear["outputs"])
        assert [ids[i] for i in clear["outputs"]][-3:-1] == ["surprise", "features"]
        assert clear["inputs"] == [clear["outputs"][-1]] and clear["outputs"][-1] in load["outputs"]
    assert handlers.clear_results(True) == (*handlers.CLEARED, False)  # cleared, once


def test_turning_the_image_clears_the_last_runs_panels(app_module, tmp_path):
    """The surprise map of the turned image sat beside sketches and figures of the upright one. The widget's rotate
    buttons send no event: the page's script clicks a hidden button, which clears every panel, unqueued."""
    handlers = handlers_for(app_module, tiny_bundle(tmp_path / "b"))
    demo = app_module.build_app(handlers)
    dependencies = demo.config["dependencies"]
    ids = {block._id: getattr(block, "elem_id", None) for block in demo.blocks.values()}
    (clear,) = [d for d in dependencies if demo.fns[d["id"]].name == "cleared"]
    assert [ids[i] for i in clear["targets"][0][:1]] == ["turned"] and clear["queue"] is False
    run = next(d for d in dependencies if d["api_name"] == "run")
    assert set(run["outputs"][:8]) <= set(clear["outputs"]) and handlers.cleared()[:-1] == handlers.CLEARED
    assert "#annotator button[aria-label^=\"Rotate\"]" in app_module.HEAD
    assert "#turned { display: none" in app_module.CSS


def test_a_box_drawn_while_a_run_waits_is_kept(app_module, tmp_path):
    """The run used to renumber the widget in its first update, so a box drawn while it waited in the queue was
    reset away; the boxes are now numbered at the press, unqueued, and the run never writes the widget."""
    demo = app_module.build_app(handlers_for(app_module, tiny_bundle(tmp_path / "b")))
    dependencies = demo.config["dependencies"]
    ids = {block._id: getattr(block, "elem_id", None) for block in demo.blocks.values()}
    run = next(d for d in dependencies if d["api_name"] == "run")
    (renumber,) = [d for d in dependencies if demo.fns[d["id"]].name == "renumbered"]
    assert renumber["targets"] == run["targets"] and renumber["queue"] is False
    assert "annotator" in [ids[i] for i in renumber["outputs"]]
    writers = [d for d in dependencies if "annotator" in [ids[i] for i in d["outputs"]]]
    assert {demo.fns[d["id"]].name for d in writers} == {"renumbered", "load_example", "load_upload"}
    # a box count the run refuses leaves the labels as the kept results number them
    handlers = handlers_for(app_module, tiny_bundle(tmp_path / "c"))
    value, source = handlers.initial_value()
    too_many = {**value, "boxes": value["boxes"] * MAX_BOXES}
    assert handlers.renumbered(too_many, source) == (app_module.gr.skip(), app_module.gr.skip())
    assert handlers.renumbered({**value, "boxes": []}, source) == (app_module.gr.skip(), app_module.gr.skip())


def test_an_image_whose_files_the_cleanup_deleted_still_runs_or_says_why(app_module, tmp_path):
    """After the daily cleanup the widget's copy of its image is gone: every panel showed a bare "Error". An
    example (its file is the bundle's) still runs; an upload (its file was the server's) says to upload again."""
    handlers = handlers_for(app_module, tiny_bundle(tmp_path / "b"))
    demo = app_module.build_app(handlers)
    annotator = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "annotator")
    gone = app_module.processing_utils.FileData(path=str(tmp_path / "deleted.png"))
    assert annotator.preprocess_image(gone) is None
    # Gradio rebuilds a session's widget from its arguments when a handler updates it: the rebuilt one too
    assert app_module.image_annotator(sources=[], image_type="numpy").preprocess_image(gone) is None
    value, source = handlers.initial_value()
    (*_, ran), = [list(handlers.run({**value, "image": None}, 1, 0, 2, None, source))[-1]]
    assert ran is True
    upload = tmp_path / "upload.png"
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(upload)
    value, source = handlers.show(str(upload), [[5, 5, 20, 20]])
    upload.unlink()
    with pytest.warns(UserWarning, match="expired on the server"):
        (outputs,) = list(handlers.run({**value, "image": None}, 1, 0, 2, None, source))
    assert "upload it again or pick an example" in outputs[1] and outputs[-1] is False
    with pytest.warns(UserWarning, match="expired on the server"):
        assert handlers.explore({**value, "image": None}, 1, source) == (None, None)


def test_the_maps_of_an_image_are_made_once_per_window(app_module, tmp_path, monkeypatch):
    """They depend on the image and the window only, take seconds on a CPU and queue before the next run."""
    handlers = handlers_for(app_module, tiny_bundle(tmp_path / "b"))
    value, source = handlers.initial_value()
    made, original = [], handlers.functions.maps
    monkeypatch.setattr(handlers.functions, "maps", lambda image, window: made.append(window) or original(image,
                                                                                                          window))
    first = handlers.explore(value, 2, source)
    moved = {**value, "boxes": value["boxes"][:1]}  # other boxes: the same maps
    assert handlers.explore(moved, 2, source) is first and made == [2]
    handlers.explore(value, 1, source)
    turned = handlers.explore({**value, "orientation": 1}, 1, source)
    assert made == [2, 1, 1] and turned[0].shape[:2] == first[0].shape[:2]


def test_the_page_shows_the_model_card_a_visitor_cannot_open_on_the_server(app_module, tmp_path):
    bundle = tiny_bundle(tmp_path / "b")
    (bundle / "MODEL_CARD.md").write_text("# Model card: a tiny test bundle\n\nkNN group 12.3 %\n")
    demo = app_module.build_app(handlers_for(app_module, bundle))
    card = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "model-card")
    assert "kNN group 12.3 %" in card.value
    (bundle / "MODEL_CARD.md").unlink()
    demo = app_module.build_app(handlers_for(app_module, bundle))
    assert not any(getattr(b, "elem_id", None) == "model-card" for b in demo.blocks.values())


def test_a_seed_the_sampler_refuses_is_said_before_any_panel_changes(app_module, tmp_path):
    """The seed was checked after the first update, which had filled the panels for the new boxes with the status
    "Drawing sketches…": that status stayed, and the note called the new panels the last run's."""
    handlers = handlers_for(app_module, tiny_bundle(tmp_path / "b"))
    value, source = handlers.initial_value()
    with pytest.warns(UserWarning, match="seed must be a whole number from 0"):
        (outputs,) = list(handlers.run(value, 1, -1, 4, None, source))
    assert all(outputs[i] == app_module.gr.skip() for i in (0, 2, 3, 4, 5, 6, 7)) and outputs[-1] is False
