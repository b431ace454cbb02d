"""The evaluation protocol: weighted kNN, linear probe, the emoji protocol's wiring, box labels, image folders."""
from __future__ import annotations

import functools
import inspect

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from ijepa.model import IJepa, IJepaConfig
from train import eval as evaluation
from train.eval import accuracy, fit_linear_probe, knn_top1, labelled_boxes, pooled_features


@pytest.fixture(scope="module")
def tiny_model() -> IJepa:
    torch.manual_seed(0)
    return IJepa(IJepaConfig.from_arch("vit_tiny", img_size=32, patch_size=8, depth=1, predictor_depth=1,
                                       predictor_embed_dim=48)).eval()


def test_knn_votes_are_weighted_by_similarity():
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    # A plain majority of the 3 neighbours says 1; exp(sim / 0.07) lets the near-identical neighbour win.
    assert knn_top1(bank, labels, query, torch.tensor([0]), num_classes=2, k=3) == 100.0
    assert knn_top1(bank, labels, query, torch.tensor([0]), num_classes=2, k=3, temperature=100.0) == 0.0
    # Cosine: scale does not matter.
    assert knn_top1(bank * 7, labels, query * 0.1, torch.tensor([0]), num_classes=2, k=1) == 100.0


def test_knn_in_blocks_matches_one_block():
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 8, generator=generator), torch.randn(70, 8, generator=generator)
    bank_labels, query_labels = torch.randint(0, 4, (300,), generator=generator), torch.randint(0, 4, (70,))
    whole = knn_top1(bank, bank_labels, queries, query_labels, num_classes=4)
    assert knn_top1(bank, bank_labels, queries, query_labels, num_classes=4, block_elements=1000) == whole  # 3 rows


def _reference_knn(bank, bank_labels, queries, num_classes, k, temperature):
    """The protocol's kNN by its definition: the k most cosine-similar bank items vote exp(similarity / T)."""
    sims = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    top, idx = sims.topk(k, dim=1)
    votes = torch.zeros(len(queries), num_classes).scatter_add_(1, bank_labels[idx], (top / temperature).exp())
    return votes.argmax(1)


def _tiny_probe_sets(img_size, patch_size, seed=0):
    """A stand-in for ``emoji_probe_sets``: 6 bank and 6 query items, 2 groups and 3 subgroups."""
    def items(offset):
        return [{**_Scenes(6)[i], "group": i % 2, "subgroup": i % 3} for i in range(offset, offset + 6)]
    return items(0), items(6), {"group": 2, "subgroup": 3}, type("Catalog", (), {"fingerprint": "x"})()


def test_the_emoji_protocol_scores_knn_with_k_20_and_temperature_0_07(tiny_model, monkeypatch):
    """The protocol (module docstring, results["protocol"]) is kNN k=20, T=0.07: figures compare across runs only
    while both hold. The other kNN tests pass k and T explicitly, so they would not notice either changing."""
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(200, 4, generator=generator), torch.randn(400, 4, generator=generator)
    bank_labels = torch.randint(0, 5, (200,), generator=generator)
    protocol = _reference_knn(bank, bank_labels, queries, 5, k=20, temperature=0.07)
    for k, temperature in ((19, 0.07), (21, 0.07), (20, 0.05), (20, 0.1)):  # the data can tell them apart
        assert not torch.equal(_reference_knn(bank, bank_labels, queries, 5, k, temperature), protocol)
    scores = evaluation.knn_scores(bank, {"group": bank_labels}, queries, {"group": protocol}, {"group": 5})
    assert scores == {"knn_group": 100.0}  # knn_scores, which every emoji figure goes through, predicts exactly so

    # ... and the emoji evaluation and the in-training monitor call it with those settings (tiny stand-in sets).
    calls = []
    signature = inspect.signature(knn_top1)

    def spy(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append((bound.arguments["k"], bound.arguments["temperature"]))
        return knn_top1(*args, **kwargs)

    monkeypatch.setattr(evaluation, "knn_top1", spy)
    monkeypatch.setattr(evaluation, "emoji_probe_sets", _tiny_probe_sets)
    monkeypatch.setattr(evaluation, "fit_linear_probe", functools.partial(fit_linear_probe, steps=1))  # not tested
    results = evaluation.evaluate_emoji_features(tiny_model, sources=("raw_pixels", "target_encoder"))
    assert "k=20 T=0.07" in results["protocol"]
    evaluation.HeldOutKnn(tiny_model.config)(tiny_model)
    assert len(calls) >= 8 and set(calls) == {(20, 0.07)}


def _record_pool_calls(monkeypatch) -> list[tuple]:
    """(model, which, first item of the dataset) for every ``_pool`` call of the evaluation."""
    calls, real = [], evaluation._pool

    def spy(model, dataset, *args, **kwargs):
        which = kwargs.get("which", args[1] if len(args) > 1 else "target")
        calls.append((model, which, dataset[0]))
        return real(model, dataset, *args, **kwargs)

    monkeypatch.setattr(evaluation, "_pool", spy)
    return calls


def _is_fresh_random_init(model, config) -> bool:
    expected = evaluation.random_init_like(config, 0, "cpu").state_dict()
    return isinstance(model, IJepa) and all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_every_row_of_the_emoji_protocol_reads_the_features_it_is_named_for(tiny_model, monkeypatch):
    """The floors compare the trained target encoder with raw pixels and a FRESH random init: a row that silently
    read another source (or the query set as the bank) would make the comparison meaningless."""
    calls = _record_pool_calls(monkeypatch)
    monkeypatch.setattr(evaluation, "emoji_probe_sets", _tiny_probe_sets)
    monkeypatch.setattr(evaluation, "fit_linear_probe", functools.partial(fit_linear_probe, steps=1))
    evaluation.evaluate_emoji_features(tiny_model)
    bank, queries, _, _ = _tiny_probe_sets(32, 8)
    bank_first, query_first = bank[0], queries[0]
    assert len(calls) == 2 * len(evaluation.FEATURE_SOURCES)  # per row: the bank, then the queries
    for (bank_call, query_call), name in zip(zip(calls[::2], calls[1::2]), evaluation.FEATURE_SOURCES):
        assert bank_call[0] is query_call[0] and bank_call[1] == query_call[1], name  # one source per row
        assert torch.equal(bank_call[2]["image"], bank_first["image"]), name  # the bank is the training emoji
        assert torch.equal(query_call[2]["image"], query_first["image"]), name  # the queries the held-out ones
    rows = dict(zip(evaluation.FEATURE_SOURCES, calls[::2]))
    assert rows["raw_pixels"][0] is None
    assert rows["target_encoder"][:2] == (tiny_model, "target")
    assert rows["context_encoder"][:2] == (tiny_model, "context")
    random_row = rows["random_init"][0]
    assert random_row is not tiny_model and rows["random_init"][1] == "target"
    assert _is_fresh_random_init(random_row, tiny_model.config)

    calls.clear()  # the in-training monitor's lines to beat: pixels and the same fresh random init
    monitor = evaluation.HeldOutKnn(tiny_model.config)
    assert [c[0] is None for c in calls] == [True, True, False, False]
    assert _is_fresh_random_init(calls[2][0], tiny_model.config) and calls[2][0] is calls[3][0]
    calls.clear()
    monitor(tiny_model)
    assert [c[0] for c in calls] == [tiny_model, tiny_model]


def test_linear_probe_standardises_and_separates():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3
    x = torch.tensor(np.concatenate([c + rng.normal(size=(50, 16)) for c in centres]), dtype=torch.float32)
    y = torch.arange(4).repeat_interleave(50)
    x = x * torch.logspace(-3, 3, 16)  # wildly different feature scales: the probe standardises them
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    train, test = order[:150], order[150:]
    probe = fit_linear_probe(x[train], y[train], 4)
    assert accuracy(probe, x[test], y[test]) == 100.0
    assert accuracy(probe, x[test], y[test].roll(1)) < 50.0


class _Scenes(Dataset):
    """Same object pixels on every image, a different background each time."""

    def __init__(self, n: int = 4):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        image = torch.rand(3, 32, 32, generator=g)
        image[:, 8:24, 8:24] = 0.5
        patch_emoji = torch.full((4, 4), -1)
        patch_emoji[1:3, 1:3] = 7
        return {"image": image, "patch_emoji": patch_emoji, "group": 0}


def test_object_only_pooling_ignores_the_background(tiny_model):
    scenes = _Scenes()
    pixels, _ = pooled_features(None, scenes, ("group",), object_only=True)
    assert torch.equal(pixels[0], pixels[1]) and pixels[0].count_nonzero() == 3 * 16 * 16
    full, _ = pooled_features(None, scenes, ("group",))
    assert not torch.equal(full[0], full[1])
    pooled, _ = pooled_features(tiny_model, scenes, ("group",), object_only=True)
    tokens = evaluation.encode(tiny_model, torch.stack([scenes[i]["image"] for i in range(4)]), "target")
    on_object = torch.tensor([5, 6, 9, 10])  # the 2 x 2 object patches of the 4 x 4 grid, row-major
    torch.testing.assert_close(pooled, tokens[:, on_object].mean(1).float())


def test_box_labels_are_the_majority_emoji_or_dropped():
    labels = torch.full((2, 4, 4), -1)
    labels[0, :, :2] = 3  # left half: emoji 3
    labels[1, 0, 0] = 5  # a single patch of emoji 5: never a majority of a 2 x 2 box
    origins, base, keep = labelled_boxes(labels, 2, 2, np.random.default_rng(0))
    assert keep.tolist() == [True, False]
    assert base[0].item() == 3 and origins[0, 1].item() in (0, 1)  # the box stays on the emoji's columns


def test_predictor_semantics_compares_true_and_predicted_boxes(tiny_model, monkeypatch):
    """A predictor that returned the truth would score exactly the probe's accuracy on true features (ratio 1);
    the real one, reading the context only, does not get the truth for free."""
    from ijepa.inference import gather, true_features

    def perfect(model, images, contexts, targets):
        return [gather(true_features(model, images), t) for t in targets]

    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "predict_features", perfect)
        ideal, probes = evaluation.evaluate_predictor_semantics(tiny_model, num_train=64, num_test=32)
    assert set(probes) == {"group", "subgroup"}
    names = ("new_scenes_group", "heldout_emoji_group", "new_scenes_subgroup", "heldout_emoji_subgroup")
    for name in names:
        assert ideal[name]["predicted_acc"] == ideal[name]["true_acc"] > 0 and ideal[name]["ratio"] == 1.0, name

    real, _ = evaluation.evaluate_predictor_semantics(tiny_model, num_train=64, num_test=32)
    for name in names:  # the same boxes and probes: only the predicted side differs
        assert real[name]["true_acc"] == ideal[name]["true_acc"]
        assert real[name]["ratio"] == pytest.approx(real[name]["predicted_acc"] / real[name]["true_acc"])
    assert any(real[name]["predicted_acc"] != real[name]["true_acc"] for name in names)


def test_predicted_box_features_come_from_the_context_only(tiny_model):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=generator)
    origins, rows, cols = torch.tensor([[0, 1], [2, 2]]), 2, 2  # patch boxes on the 4 x 4 grid
    truth, guess = evaluation.box_features(tiny_model, images, origins, rows, cols)
    repainted = images.clone()
    for image, (r0, c0) in zip(repainted, origins.tolist()):  # new pixels inside each box, context untouched
        image[:, r0 * 8:(r0 + rows) * 8, c0 * 8:(c0 + cols) * 8] = torch.rand(3, rows * 8, cols * 8,
                                                                             generator=generator)
    truth_after, guess_after = evaluation.box_features(tiny_model, repainted, origins, rows, cols)
    torch.testing.assert_close(guess_after, guess, rtol=0, atol=0)  # the predictor never saw the box
    assert (truth_after - truth).abs().max() > 1e-3  # while the box's true features did change


def _colour_images(folder, colour, count, rng):
    folder.mkdir(parents=True)
    for i in range(count):
        pixels = np.clip(np.array(colour) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")


def test_image_folder_classes(tmp_path, tiny_model, monkeypatch):
    rng = np.random.default_rng(0)
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        _colour_images(tmp_path / name, colour, 10, rng)
    seen = []
    real = evaluation.pooled_features
    monkeypatch.setattr(evaluation, "pooled_features", lambda model, data, *a, **k: seen.append((model, data))
                        or real(model, data, *a, **k))
    results = evaluation.evaluate_folder(tiny_model, tmp_path)
    assert set(results["features"]) == {"raw_pixels", "random_init", "target_encoder"}
    assert results["features"]["raw_pixels"]["knn_label"] == 100.0
    # no query is in the bank (it would find itself), and the two split every image: 16 + 4
    bank, queries = seen[0][1].indices, seen[1][1].indices
    assert not set(bank) & set(queries) and sorted(bank + queries) == list(range(20)) and len(queries) == 4
    assert [m for m, _ in seen[::2]] == [m for m, _ in seen[1::2]]  # each row: bank and queries from one source
    assert seen[0][0] is None and seen[4][0] is tiny_model and _is_fresh_random_init(seen[2][0], tiny_model.config)


def test_a_folders_raw_pixels_are_read_small_enough_for_imagenet(tiny_model):
    """224 px photos kept whole would take 600 KB per image (770 GB for ImageNet's 1.28M images); the baseline is
    area-averaged to at most FOLDER_PIXEL_SIDE on a side, and the emoji protocol's 64 px images stay whole."""
    class Photos(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"image": torch.full((3, 224, 224), float(i)), "label": torch.tensor(i)}

    side = evaluation.FOLDER_PIXEL_SIDE
    features, _ = evaluation.pooled_features(None, Photos(), ("label",), pixel_side=side)
    assert features.shape == (3, 3 * side * side) and torch.equal(features[2], torch.full((3 * side * side,), 2.0))
    whole, _ = evaluation.pooled_features(None, Photos(), ("label",))
    assert whole.shape == (3, 3 * 224 * 224)


def test_a_val_folder_missing_a_class_keeps_the_train_labels(tmp_path, tiny_model):
    rng = np.random.default_rng(0)
    colours = {"blue": (30, 30, 220), "green": (30, 200, 30), "red": (220, 30, 30)}
    for name, colour in colours.items():
        _colour_images(tmp_path / "train" / name, colour, 6, rng)
    for name in ("green", "red"):  # no blue: numbered on its own, val's classes would shift by one
        _colour_images(tmp_path / "val" / name, colours[name], 4, rng)
    results = evaluation.evaluate_folder(tiny_model, tmp_path)
    assert results["features"]["raw_pixels"]["knn_label"] == 100.0


def test_a_flat_folder_cannot_be_scored_and_says_why(tmp_path, tiny_model):
    _colour_images(tmp_path / "flat", (200, 200, 200), 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least two class sub-folders"):
        evaluation.evaluate_folder(tiny_model, tmp_path / "flat")


@pytest.mark.parametrize("data", ["missing", "a_file.txt"])
def test_a_data_path_that_is_no_folder_is_refused_before_anything_loads_or_is_written(tmp_path, data):
    """It was "[Errno 20] Not a directory" after the model had loaded, with an empty --out-dir left behind."""
    (tmp_path / "a_file.txt").write_text("")
    with pytest.raises(ValueError, match="pass 'emoji' or the path of an existing image folder"):
        evaluation.evaluate_checkpoint(tmp_path / "no_model_needed", tmp_path / "out", str(tmp_path / data))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("heldout", ["test", "valid", "Validation"])
def test_a_train_folder_is_scored_against_its_test_or_validation_folder(tmp_path, tiny_model, heldout):
    """root/{train,test}/<class>/ once became two classes, 'test' and 'train': a score of telling splits apart."""
    rng = np.random.default_rng(0)
    colours = {"blue": (30, 30, 220), "red": (220, 30, 30)}
    for name, colour in colours.items():
        _colour_images(tmp_path / "train" / name, colour, 6, rng)
        _colour_images(tmp_path / heldout / name, colour, 3, rng)
    results = evaluation.evaluate_folder(tiny_model, tmp_path)
    assert results["split"] == f"train/ vs {heldout}/"
    assert (results["bank_size"], results["query_size"]) == (12, 6)
    assert results["features"]["raw_pixels"]["knn_label"] == 100.0


def test_an_unlabelled_test_folder_leaves_train_split_80_20(tmp_path, tiny_model):
    """A competition's layout, train/<class>/ beside a flat test/ of unlabelled images, was refused outright."""
    rng = np.random.default_rng(0)
    for name, colour in (("blue", (30, 30, 220)), ("red", (220, 30, 30))):
        _colour_images(tmp_path / "train" / name, colour, 5, rng)
    _colour_images(tmp_path / "test", (120, 120, 120), 3, rng)
    results = evaluation.evaluate_folder(tiny_model, tmp_path)
    assert results["split"] == "random 80/20 (seed 0)" and (results["bank_size"], results["query_size"]) == (8, 2)


def test_an_unrecognised_split_layout_is_refused(tmp_path, tiny_model):
    rng = np.random.default_rng(0)
    for split in ("train", "holdout"):
        for name, colour in (("blue", (30, 30, 220)), ("red", (220, 30, 30))):
            _colour_images(tmp_path / split / name, colour, 3, rng)
    with pytest.raises(ValueError, match="split layout"):
        evaluation.evaluate_folder(tiny_model, tmp_path)


def test_folder_evaluation_counts_each_readable_image_once(tmp_path, tiny_model):
    """macOS ._name twins and a broken file are left out: they used to be read as the next image, scoring some
    images twice (here 12 bank items for 6 images)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for name, colour in (("blue", (30, 30, 220)), ("red", (220, 30, 30))):
            _colour_images(tmp_path / split / name, colour, count, rng)
            for i in range(count):
                (tmp_path / split / name / f"._{i}.png").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    (tmp_path / "val" / "red" / "broken.png").write_bytes(b"not an image")
    results = evaluation.evaluate_folder(tiny_model, tmp_path)
    assert (results["bank_size"], results["query_size"]) == (6, 4)


def test_a_model_trained_on_another_emoji_catalog_is_flagged(caplog):
    """The held-out split depends on emoji-test.txt, the font and Pillow's layout engine: figures from a machine
    whose split differs from the training run's are not held-out figures, and say so."""
    from ijepa.model import IJepaConfig
    from train.eval import catalog_matches

    config = IJepaConfig.from_arch("vit_tiny", img_size=32, patch_size=8, depth=1)
    assert catalog_matches(config, "abc") is None  # official weights and older models do not say
    config.data_fingerprint = "abc"
    assert catalog_matches(config, "abc") is True
    with caplog.at_level("WARNING"):
        assert catalog_matches(config, "xyz") is False
    assert "not the one the model trained on" in caplog.text


def test_the_protocols_bank_is_the_training_emoji_and_its_queries_the_held_out_ones():
    """Every other protocol test replaces these sets; a bank holding the queries would score near 100 %."""
    bank, queries, num_classes, catalog = evaluation.emoji_probe_sets(16, 8)
    bank_bases, query_bases = {int(item["emoji"]) for item in bank}, {int(item["emoji"]) for item in queries}
    assert bank_bases == set(catalog.split_ids("train").tolist())
    assert query_bases == set(catalog.split_ids("heldout").tolist()) and not bank_bases & query_bases
    assert num_classes == {"group": len(catalog.group_names), "subgroup": len(catalog.subgroup_names)}


@pytest.mark.parametrize("flag, value, message", [("--box-train", "0", "--box-train must be at least 1, got 0"),
                                                  ("--box-test", "0", "--box-test must be at least 1, got 0"),
                                                  ("--seed", "-1", "--seed must be at least 0, got -1"),
                                                  ("--img-size", "0", "--img-size must be at least 1, got 0")])
def test_bad_counts_and_seeds_are_refused_before_the_evaluation_runs(tmp_path, flag, value, message, monkeypatch,
                                                                    capsys):
    monkeypatch.setattr(evaluation, "evaluate_checkpoint", lambda *a, **k: pytest.fail("the evaluation ran"))
    with pytest.raises(SystemExit) as stop:
        evaluation.main(["--checkpoint", str(tmp_path / "model"), "--out-dir", str(tmp_path / "eval"), flag, value])
    assert stop.value.code == 2 and message in capsys.readouterr().err
