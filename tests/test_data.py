"""Tests for the emoji world (catalog, scenes, probe set) and the image-folder dataset."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import EmojiCatalog, EmojiProbeSet, EmojiScenes, ImageFolderDataset, build_dataset, get_catalog
from train.emoji import BACKGROUND_KINDS, INSTALL_HINT, Placement, SceneRenderer, fold_key, zwj_parts

REPO = Path(__file__).resolve().parents[1]


def _is_skin_toned(text: str) -> bool:
    return any(0x1F3FB <= ord(ch) <= 0x1F3FF for ch in text)


@pytest.fixture(scope="module")
def catalog() -> EmojiCatalog:
    try:
        return get_catalog()
    except FileNotFoundError as error:
        pytest.skip(f"emoji files missing: {error}")


def _assert_items_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


# ----- catalog


def test_variants_fold_into_their_base(catalog):
    thumbs_up = catalog.base_of("\U0001F44D")
    assert catalog.names[thumbs_up] == "thumbs up"
    for tone in range(0x1F3FB, 0x1F400):
        assert catalog.base_of("\U0001F44D" + chr(tone)) == thumbs_up
    assert catalog.base_of("\u261D\U0001F3FB") == catalog.base_of("\u261D\uFE0F")  # FE0F dropped with a tone
    assert catalog.names[catalog.base_of("\U0001F46E\u200D\u2640\uFE0F")] == "police officer"
    assert catalog.names[catalog.base_of("\U0001F469\U0001F3FD\u200D\u2695\uFE0F")] == "health worker"
    assert catalog.names[catalog.base_of("\U0001F468\u200D\U0001F469\u200D\U0001F467")] == "family"
    assert catalog.names[catalog.base_of("\U0001F46B")] == "people holding hands"
    assert not any("skin tone" in name for name in catalog.names)
    # "Facing right" (Emoji 15.1) is the base mirrored, and scenes flip emoji: it must never be a base of its own.
    assert fold_key([0x1F6B6, 0x200D, 0x27A1, 0xFE0F]) == fold_key([0x1F6B6, 0x1F3FD, 0x200D, 0x27A1]) == (0x1F6B6,)
    # A territory flying another country's flag is drawn identically: one base, so one split.
    norway = catalog.base_of("\U0001F1F3\U0001F1F4")
    assert catalog.base_of("\U0001F1E7\U0001F1FB") == catalog.base_of("\U0001F1F8\U0001F1EF") == norway
    assert "\U0001F44D\U0001F3FD" in catalog.variants(thumbs_up)
    assert catalog.variants(thumbs_up)[0] == "\U0001F44D"
    # Every variant maps back to the base it is listed under, so variants always share their base's split.
    for variant, base in zip(catalog.variant_texts, catalog.variant_base):
        assert catalog.base_of(variant) == base


def test_group_and_subgroup_lookups(catalog):
    assert len(catalog.group_names) == 9 and "Component" not in catalog.group_names
    assert {"skin-tone", "hair-style"}.isdisjoint(catalog.subgroup_names)
    apple = catalog.base_of("\U0001F34E")
    assert catalog.group_names[catalog.group_of[apple]] == "Food & Drink"
    assert catalog.subgroup_names[catalog.subgroup_of[apple]] == "food-fruit"
    assert torch.equal(catalog.subgroup_group[catalog.subgroup_of], catalog.group_of)
    group = int(catalog.group_of[apple])
    assert catalog.labels(torch.tensor([[-1, apple], [apple, -1]]), "group").tolist() == [[-1, group], [group, -1]]


def test_heldout_split_is_disjoint_balanced_and_stable(catalog):
    train, heldout = set(catalog.split_ids("train")), set(catalog.split_ids("heldout"))
    assert train.isdisjoint(heldout) and train | heldout == set(range(len(catalog)))
    assert 0.17 <= len(heldout) / len(catalog) <= 0.21
    subgroup_of = catalog.subgroup_of.numpy()
    for s in range(len(catalog.subgroup_names)):
        members = set(np.flatnonzero(subgroup_of == s))
        if len(members) >= 2:
            assert members & train and members & heldout, catalog.subgroup_names[s]
    # Training never sees a held-out emoji inside a sequence built from it (heart on fire from fire).
    keys = set(catalog.keys)
    for b in train:
        parts = zwj_parts(catalog.keys[b]) & keys
        assert not any(catalog.is_heldout[catalog.base_of("".join(map(chr, p)))] for p in parts), catalog.names[b]
    assert EmojiCatalog().fingerprint == catalog.fingerprint  # a fresh parse gives the same ids and split
    # ... and so does another process with another hash seed.
    code = "from train.emoji import EmojiCatalog; print(EmojiCatalog().fingerprint)"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == catalog.fingerprint


def test_missing_files_raise_with_install_hint(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.ttf") as error:
        EmojiCatalog(font_path=tmp_path / "nope.ttf")
    assert INSTALL_HINT in str(error.value)
    # The environment variable is read when the catalog is built, not at import.
    monkeypatch.setenv("IJEPA_EMOJI_TEST", str(tmp_path / "missing-emoji-test.txt"))
    with pytest.raises(FileNotFoundError, match="missing-emoji-test.txt") as error:
        EmojiCatalog()
    assert INSTALL_HINT in str(error.value)



def test_a_font_that_is_not_the_colour_emoji_font_is_refused(tmp_path):
    """Any font loads at the render size, and another one draws every emoji as the same box: a world of identical
    images. It is refused up front with the install hint, as is a file that is no font at all."""
    from PIL import ImageFont
    from train.emoji import _require_colour_emoji
    with pytest.raises(ValueError, match="does not draw emoji in colour") as error:
        _require_colour_emoji(ImageFont.load_default(size=109), Path("plain.ttf"))  # Pillow's own (Aileron)
    assert INSTALL_HINT in str(error.value)
    (tmp_path / "notes.ttf").write_text("not a font")
    with pytest.raises(ValueError, match="notes.ttf: cannot be read as the Noto Color Emoji font") as error:
        EmojiCatalog(font_path=tmp_path / "notes.ttf")
    assert INSTALL_HINT in str(error.value)

def test_environment_variable_selects_emoji_test_file(catalog, tmp_path, monkeypatch):
    lines = ["# group: Smileys & Emotion", "# subgroup: face-smiling",
             "1F600 ; fully-qualified # 😀 E1.0 grinning face",
             "1F603 ; fully-qualified # 😃 E0.6 grinning face with big eyes",
             "# group: Component", "# subgroup: skin-tone",
             "1F3FB ; component # 🏻 E1.0 light skin tone",
             "# group: People & Body", "# subgroup: hand-fingers-closed",
             "1F44D ; fully-qualified # 👍 E0.6 thumbs up",
             "1F44D 1F3FB ; fully-qualified # 👍🏻 E1.0 thumbs up: light skin tone",
             "1F44D 1F3FF ; fully-qualified # 👍🏿 E1.0 thumbs up: dark skin tone",
             "# subgroup: hand-newer-than-the-font",  # a code point the font lacks: drawn as nothing, so dropped
             "E000 ; fully-qualified # \ue000 E99.0 private use"]
    path = tmp_path / "emoji-test.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setenv("IJEPA_EMOJI_TEST", str(path))
    small = EmojiCatalog(font_path=catalog.font_path)
    assert small.names == ["grinning face", "grinning face with big eyes", "thumbs up"]
    assert small.group_names == ["Smileys & Emotion", "People & Body"]
    assert small.variant_count.tolist() == [1, 1, 3]
    assert small.render(2).mode == "RGBA" and small.render(2).getbbox() is not None


# ----- scenes


def test_scenes_are_deterministic_by_seed_and_index(catalog):
    ds = EmojiScenes(catalog, seed=3)
    _assert_items_equal(ds[7], EmojiScenes(catalog, seed=3)[7])
    assert not torch.equal(ds[7]["image"], ds[8]["image"])
    assert not torch.equal(ds[7]["image"], EmojiScenes(catalog, seed=4)[7]["image"])
    far = ds[10**12]  # a virtual infinite stream: any non-negative index works
    assert far["index"] == 10**12 and len(ds) == 100_000
    with pytest.raises(IndexError):
        ds[-1]


@pytest.mark.parametrize("resolution, patch_size", [(64, 4), (40, 8)])
def test_scene_shapes_range_and_labels(catalog, resolution, patch_size):
    ds = EmojiScenes(catalog, resolution=resolution, patch_size=patch_size, seed=1, length=50)
    train_ids = set(catalog.split_ids("train"))
    main_visible = 0
    for i in range(20):
        item = ds[i]
        image, patches = item["image"], item["patch_emoji"]
        assert image.shape == (3, resolution, resolution) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert patches.shape == (resolution // patch_size,) * 2 and patches.dtype == torch.long
        assert item["emoji"] in train_ids
        assert item["group"] == catalog.group_of[item["emoji"]] and item["subgroup"] == catalog.subgroup_of[
            item["emoji"]]
        assert set(patches[patches >= 0].tolist()) <= train_ids
        main_visible += int((patches == item["emoji"]).any())
    assert main_visible >= 18  # the main emoji is large; only rarely hidden by distractors in front of it
    assert len(ds) == 50


def test_patch_labels_follow_known_placement(catalog):
    renderer = SceneRenderer(catalog, resolution=64, patch_size=8)
    background = renderer.background("solid", np.random.default_rng(0))
    apple, ball = catalog.base_of("\U0001F34E"), catalog.base_of("\u26BD")
    bottom = Placement(int(catalog.variant_start[apple]), apple, size=32, cx=20.0, cy=20.0)
    top = Placement(int(catalog.variant_start[ball]), ball, size=16, cx=32.0, cy=32.0)
    image, patches = renderer.compose(background, [bottom, top])
    assert patches.shape == (8, 8)
    # The apple's glyph lies inside x, y in [4, 36); the ball's inside [24, 40).
    assert patches[2, 2] == apple and patches[1, 1] == apple
    assert patches[3, 3] == ball and patches[4, 4] == ball  # the upper object wins where it covers
    assert (patches[:, 5:] == -1).all() and (patches[5:, :] == -1).all()  # patches beyond both glyphs
    assert np.array_equal(image[:, :, 40:], background[:, :, 40:])  # ... show the untouched background
    assert np.array_equal(image[:, 40:, :], background[:, 40:, :])
    assert not np.array_equal(image[:, 8:24, 8:24], background[:, 8:24, 8:24])


def test_a_patchwork_background_gives_every_patch_its_own_colour(catalog):
    renderer = SceneRenderer(catalog, resolution=64, patch_size=8)
    background = renderer.background("patchwork", np.random.default_rng(0))
    cells = background.reshape(3, 8, 8, 8, 8)  # channel, patch row, pixel row, patch column, pixel column
    assert background.shape == (3, 64, 64) and 0.0 <= background.min() and background.max() <= 1.0
    assert (cells == cells[:, :, :1, :, :1]).all()  # one colour inside each patch
    colours = cells[:, :, 0, :, 0].reshape(3, 64).T
    assert len({tuple(c) for c in colours.tolist()}) == 64  # and no two patches alike
    # a kind scenes may ask for, never drawn by default, so the evaluation's probe images stay as they were
    assert "patchwork" not in BACKGROUND_KINDS and "patchwork" not in EmojiProbeSet(catalog).backgrounds
    ds = EmojiScenes(catalog, seed=0, backgrounds=("patchwork",))
    assert ds.layout(0).background == "patchwork"


def _brute_force_scene(renderer: SceneRenderer, background: np.ndarray, objects: list[Placement]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """compose() pixel by pixel: each canvas pixel looks up the glyph pixel it shows (mirrored when flipped), the
    topmost alpha > 0.5 labels it, and each patch takes its most common label (ties to the upper layer)."""
    res, p = renderer.resolution, renderer.patch_size
    image, layer = background.astype(np.float32).copy(), np.full((res, res), -1)
    for index, obj in enumerate(objects):
        rgb, alpha = renderer.glyphs.get(obj.variant, obj.size)  # unflipped, premultiplied
        h, w = alpha.shape
        x0, y0 = int(round(obj.cx - w / 2)), int(round(obj.cy - h / 2))
        for y in range(res):
            for x in range(res):
                gy, gx = y - y0, x - x0
                if 0 <= gy < h and 0 <= gx < w:
                    if obj.flip:
                        gx = w - 1 - gx
                    image[:, y, x] = image[:, y, x] * (1 - alpha[gy, gx]) + rgb[:, gy, gx]
                    if alpha[gy, gx] > 0.5:
                        layer[y, x] = index
    patches = np.full((res // p, res // p), -1)
    for r in range(res // p):
        for c in range(res // p):
            labels, counts = np.unique(layer[r * p:(r + 1) * p, c * p:(c + 1) * p], return_counts=True)
            top = labels[counts == counts.max()].max()  # ties: the upper layer
            patches[r, c] = -1 if top < 0 else objects[top].base
    return np.clip(image, 0, 1), patches


def test_patch_labels_of_flipped_emoji_across_the_border_match_a_per_pixel_check(catalog):
    renderer = SceneRenderer(catalog, resolution=64, patch_size=8)
    background = renderer.background("noise", np.random.default_rng(1))
    bases = [catalog.base_of(text) for text in ("\U0001F449", "\U0001F40C", "\U0001F34E")]  # pointing right, snail,
    hand, snail, apple = (Placement(int(catalog.variant_start[b]), b, size=s, cx=cx, cy=cy, flip=f)  # apple
                          for b, s, cx, cy, f in zip(bases, (40, 36, 24), (8.0, 58.0, 3.0), (52.0, 6.0, 60.0),
                                                     (True, True, False)))
    objects = [hand, snail, apple]  # the apple lies over the hand's lower left
    for obj, (x0, y0, x1, y1) in zip(objects, [(-12, 36, 28, 69), (40, -11, 76, 23), (-8, 48, 14, 72)]):
        h, w = renderer.glyphs.get(obj.variant, obj.size)[1].shape
        assert (round(obj.cx - w / 2), round(obj.cy - h / 2), round(obj.cx - w / 2) + w,
                round(obj.cy - h / 2) + h) == (x0, y0, x1, y1)  # off the left/top and past the right/bottom edge
    image, patches = renderer.compose(background, objects)
    want_image, want_patches = _brute_force_scene(renderer, background, objects)
    assert np.array_equal(patches, want_patches)
    np.testing.assert_allclose(image, want_image, atol=1e-6)
    assert set(np.unique(patches)) == {-1, *bases}
    # The check can tell a flip apart: unflipped, the two flipped glyphs would label other patches.
    unflipped = [Placement(o.variant, o.base, o.size, o.cx, o.cy) for o in objects]
    assert not np.array_equal(_brute_force_scene(renderer, background, unflipped)[1], want_patches)


def test_a_patch_two_copies_of_one_emoji_mostly_cover_is_labelled_with_it(catalog):
    renderer = SceneRenderer(catalog, resolution=16, patch_size=8)
    layer = np.full((16, 16), -1)  # what each pixel shows: -1 background, else the index of the object on top
    layer[:2, :8] = 0  # patch (0, 0): 16 pixels of the first copy of base 5,
    layer[2:4, :8] = 1  # 16 of its second copy (a sibling), 8 of another base, 24 of background
    layer[4, :8] = 2
    patches = renderer._patch_labels(layer, [5, 5, 9])
    assert patches[0, 0] == 5  # 32 of 64 pixels are base 5, though neither copy alone outnumbers the background
    assert (patches.ravel()[1:] == -1).all()


def test_a_patch_split_evenly_goes_to_the_emoji_on_top(catalog):
    """Ties: an emoji beats the background, and of two emoji the one drawn later (on top) wins."""
    renderer = SceneRenderer(catalog, resolution=16, patch_size=8)
    layer = np.full((16, 16), -1)
    layer[:4, :8] = 0  # patch (0, 0): 32 pixels of the first emoji (base 5), 32 of background
    layer[8:12, :8] = 0  # patch (1, 0): 32 pixels of the first emoji, 32 of the second (base 9), drawn over it
    layer[12:, :8] = 1
    patches = renderer._patch_labels(layer, [5, 9])
    assert patches[0, 0] == 5 and patches[1, 0] == 9
    # two copies of base 5 with base 9 drawn between them: 32 pixels of 5 (both copies) against 32 of 9, and a
    # copy of 5 is on top, so 5 wins (their pixels were pooled on the lower copy, and 9 won the tie)
    layer = np.full((16, 16), -1)
    layer[:2, :8], layer[2:4, :8], layer[4:8, :8] = 0, 2, 1
    assert renderer._patch_labels(layer, [5, 9, 5])[0, 0] == 5


def test_main_emoji_sampling_is_balanced_over_bases(catalog):
    ds = EmojiScenes(catalog, seed=0)
    mains = [ds.layout(i) for i in range(3000)]
    mains = [layout.objects[layout.main] for layout in mains]
    toned = np.mean([_is_skin_toned(catalog.variant_texts[m.variant]) for m in mains])
    toned_among_all_variants = np.mean([_is_skin_toned(t) for t in catalog.variant_texts])
    assert toned_among_all_variants > 0.4  # what uniform sampling over sequences would give
    assert 0.0 < toned < 0.2
    counts = np.bincount([m.base for m in mains], minlength=len(catalog))
    assert counts[catalog.split_ids("heldout")].sum() == 0
    # Subgroup balancing evens out the huge country-flag subgroup.
    flags = catalog.subgroup_names.index("country-flag")
    flag_share = np.mean([int(catalog.subgroup_of[m.base]) == flags for m in mains])
    balanced = EmojiScenes(catalog, seed=0, balance="subgroup")
    balanced_share = np.mean([int(catalog.subgroup_of[balanced.layout(i).objects[balanced.layout(i).main].base])
                              == flags for i in range(1000)])
    assert balanced_share < flag_share / 3


def test_scene_knobs_are_respected(catalog):
    ds = EmojiScenes(catalog, seed=2, main_scale=(0.5, 0.5), num_distractors=(2, 2), backgrounds=("checker",))
    for i in range(10):
        layout = ds.layout(i)
        assert len(layout.objects) == 3 and layout.background == "checker"
        assert layout.objects[layout.main].size == 32
    with pytest.raises(ValueError, match="patch_size"):
        EmojiScenes(catalog, resolution=64, patch_size=5)
    with pytest.raises(ValueError, match="backgrounds"):
        EmojiScenes(catalog, backgrounds=("plaid",))
    # numpy takes no negative seed: said at once, not at the first item in a DataLoader worker
    with pytest.raises(ValueError, match="seed must be at least 0, got -1"):
        EmojiScenes(catalog, seed=-1)
    with pytest.raises(ValueError, match="seed must be at least 0, got -1"):
        EmojiProbeSet(catalog, seed=-1)


def test_same_base_distractors_are_siblings_of_the_main_emoji(catalog):
    siblings = EmojiScenes(catalog, seed=3, num_distractors=(3, 3), same_base_prob=1.0)
    strangers = EmojiScenes(catalog, seed=3, num_distractors=(3, 3))
    for i in range(20):
        layout = siblings.layout(i)
        assert {obj.base for obj in layout.objects} == {layout.objects[layout.main].base}
    mixed = [len({o.base for o in strangers.layout(i).objects}) for i in range(20)]
    assert np.mean(mixed) > 3.5  # independent draws almost never repeat a base
    half = EmojiScenes(catalog, seed=3, num_distractors=(3, 3), same_base_prob=0.5)
    share = np.mean([o.base == half.layout(i).objects[half.layout(i).main].base
                     for i in range(200) for o in half.layout(i).objects]) - 0.25  # minus the main itself
    assert 0.3 < share < 0.45  # 3 of 4 objects are distractors, half of them siblings: ~0.375
    with pytest.raises(ValueError, match="same_base_prob"):
        EmojiScenes(catalog, same_base_prob=1.5)


def test_themed_scenes_load_in_spawned_workers_as_in_the_main_process(catalog):
    """Spawn (macOS and Windows) and forkserver (Linux from Python 3.14) workers receive the dataset pickled, which
    moves the catalog's tensors into shared memory: a numpy view of one once pointed at freed memory afterwards."""
    scenes = EmojiScenes(catalog, theme_prob=1.0, theme="subgroup", num_distractors=(2, 3), seed=5)
    expected = [scenes[i]["image"] for i in range(4)]
    loader = torch.utils.data.DataLoader(scenes, batch_size=None, sampler=range(4), num_workers=1,
                                         multiprocessing_context="spawn")
    for got, want in zip(loader, expected):
        assert torch.equal(got["image"], want)
    assert all(torch.equal(scenes[i]["image"], expected[i]) for i in range(4))  # the parent's copy is intact too


def test_themed_distractors_share_the_main_emojis_subgroup_or_group(catalog):
    for theme, table in (("subgroup", catalog.subgroup_of), ("group", catalog.group_of)):
        themed = EmojiScenes(catalog, seed=3, num_distractors=(3, 3), theme_prob=1.0, theme=theme)
        for i in range(20):
            layout = themed.layout(i)
            assert {int(table[o.base]) for o in layout.objects} == {int(table[layout.objects[layout.main].base])}
            assert all(not catalog.is_heldout[o.base] for o in layout.objects)  # themes stay inside the split
    plain = EmojiScenes(catalog, seed=3, num_distractors=(3, 3))
    layouts = [plain.layout(i) for i in range(50)]
    shared = np.mean([int(catalog.group_of[o.base]) == int(catalog.group_of[layout.objects[layout.main].base])
                      for layout in layouts for o in layout.objects])
    assert shared < 0.6  # without a theme, distractors mostly come from other groups (1 of 4 objects is the main)
    with pytest.raises(ValueError, match="theme_prob"):
        EmojiScenes(catalog, theme_prob=-0.1)
    with pytest.raises(ValueError, match="theme"):
        EmojiScenes(catalog, theme="colour")


def test_heldout_scenes_show_only_heldout_emoji(catalog):
    """Held-out scores mean something only if split="heldout" scenes never show a training emoji."""
    heldout, train = set(catalog.split_ids("heldout").tolist()), set(catalog.split_ids("train").tolist())
    scenes = EmojiScenes(catalog, resolution=32, patch_size=4, seed=1, split="heldout", num_distractors=(2, 2))
    for i in range(20):
        item = scenes[i]
        assert item["emoji"] in heldout and item["emoji"] not in train
        shown = set(item["patch_emoji"].unique().tolist()) - {-1}
        assert shown and shown <= heldout  # distractors too
        layout = scenes.layout(i)
        assert {o.base for o in layout.objects} <= heldout
        assert all(catalog.variant_base[o.variant] in heldout for o in layout.objects)


def test_neighbouring_seeds_do_not_replay_each_others_scenes(catalog):
    """An eval stream seeded seed+1 must not replay the training stream shifted by one index."""
    a, b = EmojiScenes(catalog, seed=3), EmojiScenes(catalog, seed=4)
    for i in range(7, 10):
        assert a.layout(i + 1) != b.layout(i)
        assert not torch.equal(a[i + 1]["image"], b[i]["image"])


def test_scene_layouts_vary_as_documented(catalog):
    """Pretraining relies on the documented variety: several backgrounds, ~half flips, distractors in front of and
    behind the main emoji, and a main emoji cropped by the border at most max_crop of its side."""
    scenes = EmojiScenes(catalog, seed=6, num_distractors=(1, 3))
    layouts = [scenes.layout(i) for i in range(300)]
    kinds = {layout.background for layout in layouts}
    assert len(kinds) >= 5 and kinds <= {"solid", "linear", "radial", "stripes", "checker", "dots", "noise"}
    flips = [o.flip for layout in layouts for o in layout.objects]
    assert 0.3 < np.mean(flips) < 0.7
    front = [(len(layout.objects) - 1 - layout.main) / (len(layout.objects) - 1) for layout in layouts]
    assert 0.3 < np.mean(front) < 0.7  # distractor_front_prob=0.5: both in front and behind
    assert any(layout.main == 0 for layout in layouts) and any(layout.main > 0 for layout in layouts)
    res = scenes.resolution
    for layout in layouts:  # default max_crop=0.25: at most a quarter of the side falls outside
        m = layout.objects[layout.main]
        for c in (m.cx, m.cy):
            assert c - m.size / 2 >= -0.25 * m.size - 1e-6 and c + m.size / 2 <= res + 0.25 * m.size + 1e-6
    inside = EmojiScenes(catalog, seed=6, max_crop=0.0)
    for i in range(300):
        layout = inside.layout(i)
        m = layout.objects[layout.main]
        for c in (m.cx, m.cy):
            assert m.size / 2 - 1e-6 <= c <= res - m.size / 2 + 1e-6  # max_crop=0: never cut by the border


# ----- probe set


def test_probe_set_covers_each_split_once_per_copy(catalog):
    queries = EmojiProbeSet(catalog, split="heldout", copies=2, seed=0)
    heldout = catalog.split_ids("heldout")
    assert len(queries) == 2 * len(heldout)
    first, second = queries[0], queries[1]
    assert first["emoji"] == second["emoji"] == heldout[0]
    assert not torch.equal(first["image"], second["image"])  # copies differ
    _assert_items_equal(first, EmojiProbeSet(catalog, split="heldout", copies=2, seed=0)[0])
    assert first["image"].shape == (3, 64, 64)
    # The emoji is centred: the centre patch is labelled with it, the corner patch is background.
    assert first["patch_emoji"][8, 8] == first["emoji"] and first["patch_emoji"][0, 0] == -1
    bank = EmojiProbeSet(catalog, split="train", copies=1)
    assert len(bank) == len(catalog.split_ids("train"))
    with pytest.raises(IndexError):
        queries[len(queries)]


# ----- image folders


def _write_png(path: Path, seed: int, size: tuple[int, int] = (20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    for i, (cls, name) in enumerate([("cat", "a.png"), ("cat", "b.png"), ("ant", "c.png"), ("ant", "d.jpg")]):
        _write_png(tmp_path / cls / name, seed=i)
    ds = ImageFolderDataset(tmp_path, resolution=8, seed=0)
    assert ds.classes == ["ant", "cat"] and len(ds) == 4
    assert [label for _, label in ds.samples] == [0, 0, 1, 1]
    rng_state = torch.get_rng_state()
    item = ds[2]
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is untouched
    assert item["image"].shape == (3, 8, 8) and item["label"] in (0, 1) and item["index"] == 2
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    _assert_items_equal(item, ImageFolderDataset(tmp_path, resolution=8, seed=0)[2])  # deterministic crops
    assert not torch.equal(ImageFolderDataset(tmp_path, resolution=8, seed=1)[2]["image"], item["image"])


def test_image_folder_training_crops_use_the_official_scale(tmp_path):
    """I-JEPA's recipe crops 30-100% of the image; torchvision's default 8% would train on far smaller crops."""
    _write_png(tmp_path / "a.png", seed=0)
    ds = ImageFolderDataset(tmp_path, resolution=8)
    crop = ds.transform.transforms[0]
    assert type(crop).__name__ == "RandomResizedCrop" and tuple(crop.scale) == (0.3, 1.0)
    assert tuple(ImageFolderDataset(tmp_path, resolution=8, scale=(0.5, 0.9)).transform.transforms[0].scale) == (
        0.5, 0.9)


def test_image_folder_eval_centre_crops_rather_than_stretches(tmp_path):
    """Evaluation resizes the short side and centre-crops, as the official recipe does: a wide image is cropped,
    not squashed, so its left and right quarters are not shown."""
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)  # 32 wide, 16 high
    pixels[:, :8, 0] = 255  # left quarter red
    pixels[:, 8:, 2] = 255  # the rest blue
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = ImageFolderDataset(tmp_path, resolution=16, mode="eval")[0]["image"]
    assert image.shape == (3, 16, 16)
    assert image[0].max() == 0 and (image[2] == 1).all()


def test_image_folder_training_order_is_shuffled_per_epoch_and_reproducible(tmp_path):
    """A class-sorted folder (ImageNet's layout) read in file order gives one-class batches: the training order
    covers every file once per epoch, mixes classes within a batch, changes between epochs, and is a pure
    function of (seed, index) so that a resumed run reads the same files."""
    for c in range(4):
        for i in range(8):
            _write_png(tmp_path / f"class{c}" / f"{i}.png", seed=10 * c + i, size=(4, 4))
    ds = ImageFolderDataset(tmp_path, resolution=4, seed=0)
    n = len(ds)
    epochs = [[ds._file_index(e * n + i) for i in range(n)] for e in range(3)]
    assert all(sorted(order) == list(range(n)) for order in epochs)  # every file once per epoch
    assert len({tuple(order) for order in epochs}) == 3 and epochs[0] != list(range(n))  # three orders
    first_batch_labels = {ds[i]["label"] for i in range(8)}
    assert len(first_batch_labels) > 1  # file order would give one class
    again = ImageFolderDataset(tmp_path, resolution=4, seed=0)
    assert [again._file_index(i) for i in reversed(range(3 * n))] == [f for order in epochs for f in order][::-1]
    assert [ImageFolderDataset(tmp_path, resolution=4, seed=1)._file_index(i) for i in range(n)] != epochs[0]
    evaluation = ImageFolderDataset(tmp_path, resolution=4, mode="eval")
    assert [evaluation[i]["label"] for i in range(n)] == [label for _, label in evaluation.samples]


def test_a_truncated_jpeg_is_left_out_before_evaluation_starts(tmp_path, caplog):
    """Pillow's verify() reads a JPEG's header only: a file cut short passed, and stopped the evaluation partway."""
    (tmp_path / "cats").mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "cats" / f"{i}.jpg")
    whole = (tmp_path / "cats" / "0.jpg").read_bytes()
    (tmp_path / "cats" / "0.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "cats" / "1.jpg").write_bytes((tmp_path / "cats" / "1.jpg").read_bytes() + b"camera trailer")
    with caplog.at_level(logging.WARNING):
        data = ImageFolderDataset(tmp_path / "cats", 32, mode="eval")
    assert sorted(p.name for p, _ in data.samples) == ["1.jpg", "2.jpg"]  # data after the end marker still reads
    assert "leaving out 1 of 3" in caplog.text and "truncated" in caplog.text
    assert all(torch.isfinite(data[i]["image"]).all() for i in range(len(data)))


def test_image_folder_flat_eval_and_errors(tmp_path, caplog):
    for i in range(3):
        _write_png(tmp_path / "flat" / f"{i}.png", seed=i)
    (tmp_path / "flat" / "broken.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(tmp_path / "flat", resolution=12, mode="eval")
    # Evaluation leaves the unreadable file out when it builds the set (one warning naming it), so every item is a
    # distinct file; reading the next file in its place would score one image twice.
    assert "broken.png" in caplog.text and "1 of 4" in caplog.text
    assert ds.classes == [] and {label for _, label in ds.samples} == {-1}
    assert [p.name for p, _ in ds.samples] == ["0.png", "1.png", "2.png"] and len(ds) == 3
    assert ds[2]["image"].shape == (3, 12, 12)
    _assert_items_equal(ds[0], ImageFolderDataset(tmp_path / "flat", resolution=12, mode="eval")[0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", resolution=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "absent", resolution=8)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"not an image either")
    with pytest.raises(FileNotFoundError, match="none of the 1 image files"):
        ImageFolderDataset(tmp_path / "junk", resolution=8, mode="eval")
    with pytest.raises(ValueError, match="seed must be at least 0, got -1"):
        ImageFolderDataset(tmp_path / "flat", resolution=8, seed=-1)


def test_image_folder_decodes_files_as_the_app_does(tmp_path):
    """16-bit, transparent and EXIF-rotated files: training and evaluation see what the app shows (to_rgb)."""
    ramp = np.linspace(0, 60000, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "a_ramp16.png")  # mode I;16: convert("RGB") clipped it to white
    clear = np.zeros((16, 16, 4), dtype=np.uint8)
    clear[..., 0] = 255  # red, but fully transparent: composited onto white, as the app does
    Image.fromarray(clear, "RGBA").save(tmp_path / "b_clear.png")
    halves = np.zeros((16, 16, 3), dtype=np.uint8)
    halves[:, :8, 0] = halves[:, 8:, 2] = 255  # stored red | blue, tagged "rotate 180": shown blue | red
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.fromarray(halves).save(tmp_path / "c_rotated.png", exif=exif)
    ds = ImageFolderDataset(tmp_path, resolution=16, mode="eval")
    assert [p.name for p, _ in ds.samples] == ["a_ramp16.png", "b_clear.png", "c_rotated.png"]
    grey = ds[0]["image"]
    assert grey.mean().item() == pytest.approx(30000 / 65535, abs=0.01)
    assert torch.equal(grey[0], grey[1]) and grey[0, 0, 0] == 0 and grey[0, -1, -1] > 0.9
    assert torch.equal(ds[1]["image"], torch.ones(3, 16, 16))
    rotated = ds[2]["image"]
    assert (rotated[2, :, :8] == 1).all() and (rotated[0, :, 8:] == 1).all() and rotated[0, :, :8].max() == 0


def test_image_folder_ignores_dot_files_and_evaluates_each_readable_file_once(tmp_path, caplog):
    """macOS copies leave ._name AppleDouble twins (not images) that sort first: each once read as the next real
    file, so two classes of 3 images gave 12 items of 6 distinct images."""
    for c, cls in enumerate(("ant", "cat")):
        for i in range(3):
            _write_png(tmp_path / cls / f"{i}.png", seed=10 * c + i)
            (tmp_path / cls / f"._{i}.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    _write_png(tmp_path / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png", seed=10)  # a copy, hidden
    _write_png(tmp_path / ".Trashes" / "x.png", seed=99)  # a hidden folder is not a class
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    train = ImageFolderDataset(tmp_path, resolution=8)
    assert train.classes == ["ant", "cat"] and len(train) == 7  # nothing checked up front in training
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(tmp_path, resolution=8, mode="eval")
    assert ds.classes == ["ant", "cat"] and len(ds) == 6
    assert [label for _, label in ds.samples] == [0, 0, 0, 1, 1, 1]
    images = [ds[i]["image"] for i in range(len(ds))]
    assert all(not torch.equal(a, b) for i, a in enumerate(images) for b in images[i + 1:])  # 6 distinct images
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 of 7" in warnings[0].getMessage() and "broken.png" in warnings[0].getMessage()


def test_image_folder_training_replaces_an_unreadable_file_and_says_so_once(tmp_path, caplog, monkeypatch):
    _write_png(tmp_path / "a.png", seed=0, size=(8, 8))
    _write_png(tmp_path / "b.png", seed=1, size=(20, 16))
    (tmp_path / "c.png").write_bytes(b"not an image")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # b.png (320 pixels > 2 x 100) is now a decompression bomb
    ds = ImageFolderDataset(tmp_path, resolution=8, seed=0)
    assert len(ds) == 3
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(3 * len(ds))]  # three epochs: every file read three times
    assert all(item["image"].shape == (3, 8, 8) for item in items)
    for name in ("b.png", "c.png"):  # skipped, not raised; one warning each
        assert sum(name in r.getMessage() for r in caplog.records) == 1, name
    assert "DecompressionBombError" in caplog.text
    readable = ImageFolderDataset(tmp_path, resolution=8, mode="eval")
    assert [p.name for p, _ in readable.samples] == ["a.png"]


def test_image_folder_evaluation_raises_rather_than_reading_another_file(tmp_path, monkeypatch):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "b.jpg").write_bytes(data[:len(data) // 2])  # fails to decode
    # a file the up-front check passes but whose pixels do not decode (that check reads headers, not every byte)
    monkeypatch.setattr("train.data._unreadable_reason", lambda path: None)
    ds = ImageFolderDataset(tmp_path, resolution=8, mode="eval")
    assert len(ds) == 2 and ds[0]["image"].shape == (3, 8, 8)
    with pytest.raises(RuntimeError, match="b.jpg"):
        ds[1]


def test_image_folder_refuses_a_split_layout_as_classes(tmp_path):
    """root/{train,test}/<class>/: the splits would become the two labels, and a model would be scored on telling
    training images from test images."""
    for split in ("train", "test"):
        for c, cls in enumerate(("cat", "dog")):
            _write_png(tmp_path / "data" / split / cls / "0.png", seed=c, size=(8, 8))
    for mode in ("train", "eval"):
        with pytest.raises(ValueError, match="split layout"):
            ImageFolderDataset(tmp_path / "data", resolution=8, mode=mode)
    assert ImageFolderDataset(tmp_path / "data" / "train", resolution=8).classes == ["cat", "dog"]
    # Nested class folders whose inner folders differ (photo sessions) are still classes.
    _write_png(tmp_path / "nested" / "cat" / "monday" / "0.png", seed=0, size=(8, 8))
    _write_png(tmp_path / "nested" / "dog" / "tuesday" / "0.png", seed=1, size=(8, 8))
    assert ImageFolderDataset(tmp_path / "nested", resolution=8).classes == ["cat", "dog"]
    # So are class folders that share an inner folder's name (cat/images/, dog/images/): they were refused.
    _write_png(tmp_path / "shared" / "cat" / "images" / "0.png", seed=0, size=(8, 8))
    _write_png(tmp_path / "shared" / "dog" / "images" / "0.png", seed=1, size=(8, 8))
    assert ImageFolderDataset(tmp_path / "shared", resolution=8).classes == ["cat", "dog"]
    # Split names are read in any case: Train/, Val/ as well as train/, val/.
    for split in ("Train", "Val"):
        _write_png(tmp_path / "capital" / split / "cat" / "0.png", seed=0, size=(8, 8))
    with pytest.raises(ValueError, match="split layout"):
        ImageFolderDataset(tmp_path / "capital", resolution=8)


def test_build_dataset(catalog, tmp_path):
    scenes = build_dataset("emoji", resolution=32, patch_size=4, seed=5, length=10)
    assert isinstance(scenes, EmojiScenes) and scenes[0]["patch_emoji"].shape == (8, 8) and len(scenes) == 10
    _write_png(tmp_path / "x.png", seed=0)
    folder = build_dataset(tmp_path, resolution=16, patch_size=4, seed=0)
    assert isinstance(folder, ImageFolderDataset) and folder[0]["image"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="emoji"):
        build_dataset(tmp_path / "absent", resolution=16, patch_size=4, seed=0)


def test_ranks_read_disjoint_batches_that_cover_every_sample_once_and_resume_where_they_stopped():
    """Two DDP ranks must not train on the same images (their weights would still agree and the loss still fall,
    so the two-process test alone cannot see it); a resumed run reads on from the step it stopped at."""
    from train.data import StepBatches

    steps, batch = 5, 3
    per_rank = [[i for b in StepBatches(0, steps, batch, rank, 2) for i in b] for rank in (0, 1)]
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(2 * steps * batch))
    assert all(len(b) == batch for b in StepBatches(0, steps, batch, 0, 2))
    resumed = list(StepBatches(3, steps, batch, 1, 2))
    assert len(resumed) == 2 and resumed == list(StepBatches(0, steps, batch, 1, 2))[3:]
    # together the ranks read, step by step, what one process with their combined batch reads
    together = [a + b for a, b in zip(StepBatches(0, steps, batch, 0, 2), StepBatches(0, steps, batch, 1, 2))]
    assert together == list(StepBatches(0, steps, 2 * batch, 0, 1))


def test_a_folder_whose_images_lie_mostly_beside_its_sub_folders_is_refused(tmp_path, caplog):
    """100 photos and a thumbs/ sub-folder of 2 used to train on the 2 thumbnails, with only a warning."""
    for i in range(5):
        _write_png(tmp_path / "mixed" / f"{i}.png", seed=i)
    for i in range(2):
        _write_png(tmp_path / "mixed" / "thumbs" / f"{i}.png", seed=10 + i)
    with pytest.raises(ValueError, match=r"mixed holds 5 images directly and 2 in sub-folders \(thumbs\)"):
        ImageFolderDataset(tmp_path / "mixed", resolution=8)
    for i in range(6):  # class sub-folders with a few stray images beside them: the classes, and a warning
        _write_png(tmp_path / "mixed" / "cats" / f"{i}.png", seed=20 + i)
    with caplog.at_level(logging.WARNING):
        assert len(ImageFolderDataset(tmp_path / "mixed", resolution=8)) == 8
    assert "ignoring 5 image(s) directly inside it" in caplog.text
