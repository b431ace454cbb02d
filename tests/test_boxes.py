"""User boxes -> patch indices (ijepa/boxes.py): which patches a box hides, and the context left to the model.
``map_boxes``, which checks boxes drawn on a user's image, is tested with the engine (tests/test_engine.py)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ijepa.boxes import box_to_patch_indices, boxes_to_masks

@settings(max_examples=100, deadline=1000)
@given(width=st.integers(1, 2000), height=st.integers(1, 2000), fx=st.floats(0, 1, exclude_max=True),
       fy=st.floats(0, 1, exclude_max=True), grid=st.integers(1, 32))
def test_one_pixel_box_selects_one_patch(width, height, fx, fy, grid):
    x, y = int(fx * width), int(fy * height)
    indices = box_to_patch_indices((x, y, x + 1, y + 1), (width, height), grid)
    # One pixel covers at most an eighth of a patch when patches are at least 8 pixels.
    if width >= 8 * grid and height >= 8 * grid:
        assert indices.numel() == 1
        row, col = divmod(int(indices[0]), grid)
        assert row == min(int((y + 0.5) / height * grid), grid - 1)
        assert col == min(int((x + 0.5) / width * grid), grid - 1)
    assert indices.numel() >= 1


def test_whole_image_box_selects_every_patch_and_leaves_no_context():
    indices = box_to_patch_indices((0, 0, 640, 480), (640, 480), (12, 16))
    assert torch.equal(indices, torch.arange(12 * 16))
    with pytest.raises(ValueError, match="no context"):
        boxes_to_masks([(0, 0, 640, 480)], (640, 480), (12, 16))


@settings(max_examples=100, deadline=1000)
@given(x0=st.integers(0, 63), y0=st.integers(0, 63), w=st.integers(1, 64), h=st.integers(1, 64),
       gh=st.integers(1, 32), gw=st.integers(1, 32))
def test_patches_do_not_depend_on_image_resolution(x0, y0, w, h, gh, gw):
    box = (x0, y0, min(x0 + w, 64), min(y0 + h, 64))
    small = box_to_patch_indices(box, (64, 64), (gh, gw))
    large = box_to_patch_indices(tuple(10 * v for v in box), (640, 640), (gh, gw))
    assert torch.equal(small, large)
    assert bool((small[1:] > small[:-1]).all()) and int(small.max()) < gh * gw


def test_patches_the_box_covers_beyond_a_sliver_count():
    # 64 px image, 4x4 grid: 16 px patches.
    assert box_to_patch_indices((0, 0, 24, 16), (64, 64), 4).tolist() == [0, 1]  # patch 1 half covered
    assert box_to_patch_indices((0, 0, 19, 16), (64, 64), 4).tolist() == [0, 1]  # 3/16 of patch 1
    assert box_to_patch_indices((0, 0, 18, 16), (64, 64), 4).tolist() == [0]  # an eighth: an overshoot, forgiven
    assert box_to_patch_indices((16, 16, 48, 48), (64, 64), 4).tolist() == [5, 6, 9, 10]
    # A non-square image and grid: only the relative position matters.
    assert box_to_patch_indices((0, 0, 100, 50), (200, 100), (2, 4)).tolist() == [0, 1]

    # Exactly an eighth over, anywhere on a ViT-H grid: forgiven in every column alike (float32 rounding of the
    # box's edges once hid the next column at some positions and not at others).
    for size, grid in ((224, 14), (224, 16), (448, 28)):
        patch = size // grid
        for k in range(grid - 1):
            right = box_to_patch_indices((patch * k, 0, patch * (k + 1) + patch / 8, patch), (size, size), grid)
            left = box_to_patch_indices((patch * (k + 1) - patch / 8, 0, patch * (k + 2), patch), (size, size), grid)
            assert right.tolist() == [k] and left.tolist() == [k + 1], (size, grid, k)


def test_boxes_across_patch_borders_hide_every_patch_they_reach_into():
    # 64 px image, 4x4 grid of 16 px patches. A full-height strip just under one patch wide, straddling the border
    # of columns 0 and 1 (47.5 % of each): both columns are hidden, so the model sees none of the strip.
    assert box_to_patch_indices((8.4, 0, 23.6, 64), (64, 64), 4).tolist() == [0, 1, 4, 5, 8, 9, 12, 13]
    # 1.4 x 1.4 patches offset by 0.3: 70 % of two rows and two columns each -> a 2 x 2 block.
    assert box_to_patch_indices((4.8, 4.8, 27.2, 27.2), (64, 64), 4).tolist() == [0, 1, 4, 5]


@settings(max_examples=200, deadline=1000)
@given(x0=st.floats(0, 63), y0=st.floats(0, 63), w=st.floats(0.5, 64), h=st.floats(0.5, 64),
       gh=st.integers(1, 16), gw=st.integers(1, 16))
def test_a_box_hides_a_whole_rectangle_of_patches_containing_its_centre(x0, y0, w, h, gh, gw):
    x1, y1 = min(x0 + w, 64.0), min(y0 + h, 64.0)
    indices = box_to_patch_indices((x0, y0, x1, y1), (64, 64), (gh, gw))
    rows, cols = indices // gw, indices % gw
    row_set, col_set = sorted(set(rows.tolist())), sorted(set(cols.tolist()))
    assert indices.numel() == len(row_set) * len(col_set)  # every (row, col) pair: a rectangle
    assert row_set == list(range(row_set[0], row_set[-1] + 1)) and col_set == list(range(col_set[0], col_set[-1] + 1))
    centre_row, centre_col = min(int((y0 + y1) / 128 * gh), gh - 1), min(int((x0 + x1) / 128 * gw), gw - 1)
    assert centre_row in row_set and centre_col in col_set
    # the model sees nothing inside the box but slivers of at most 1/8 patch along its edges
    sliver_y, sliver_x = 64 / gh / 8 + 1e-6, 64 / gw / 8 + 1e-6
    assert row_set[0] * 64 / gh <= y0 + sliver_y and (row_set[-1] + 1) * 64 / gh >= y1 - sliver_y
    assert col_set[0] * 64 / gw <= x0 + sliver_x and (col_set[-1] + 1) * 64 / gw >= x1 - sliver_x


def test_boxes_to_masks_context_and_targets():
    context, targets = boxes_to_masks([(0, 0, 16, 16), {"xmin": 48, "ymin": 48, "xmax": 64, "ymax": 64}],
                                      (64, 64), 4)
    assert [t.tolist() for t in targets] == [[0], [15]]
    assert context.tolist() == list(range(1, 15))
    with pytest.raises(ValueError, match="at least one"):
        boxes_to_masks([], (64, 64), 4)


@pytest.mark.parametrize("box, message", [
    ((10, 10, 10, 20), "Degenerate"),
    ((10, 20, 30, 5), "Degenerate"),
    ((-20, 0, 30, 30), "outside"),
    ((-0.5, 0, 30, 30), "outside"),  # boxes_to_masks takes boxes inside the view: map_boxes clips them
    ((0, 0, 30, 90), "outside"),
    ((0, 0, 30), "xmin, ymin, xmax, ymax"),
    ({"xmin": 0, "ymin": 0, "xmax": 5}, "ymax"),
    ((0, 0, float("nan"), 5), "finite"),
])
def test_invalid_boxes_are_rejected(box, message):
    with pytest.raises(ValueError, match=message):
        box_to_patch_indices(box, (64, 64), 4)
