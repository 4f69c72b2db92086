"""WindowLayout: arithmetic, index tables against a direct enumeration, and every input error."""

import pytest
import torch

from cos_kernels import WindowLayout
from oracle import random_layout, seeded_rng


def test_cos80_arithmetic():
    layout = WindowLayout(16, [16, 4], [16, 64])
    assert layout.grid == (16, 16) and layout.num_patches == 256
    assert layout.num_scales == 2
    assert layout.windows == ((16, 16), (4, 4))
    assert layout.window_grids == ((1, 1), (4, 4))
    assert layout.windows_per_scale == (1, 16)
    assert layout.queries_per_window == (16, 4)
    assert layout.patches_per_window == (256, 16)
    assert layout.total_queries == 80 and layout.total_windows == 17
    assert layout.query_offsets == (0, 16, 80)
    assert layout.window_offsets == (0, 1, 17)


def test_cos1296_arithmetic():
    layout = WindowLayout(32, [32, 8, 2], [16, 256, 1024])
    assert layout.windows_per_scale == (1, 16, 256)
    assert layout.queries_per_window == (16, 16, 4)
    assert layout.total_queries == 1296
    assert layout.query_offsets == (0, 16, 272, 1296)


def test_rectangular_grid_and_windows():
    layout = WindowLayout((6, 10), [(3, 5), (6, 2), 1], [4, 10, 60])
    assert layout.window_grids == ((2, 2), (1, 5), (6, 10))
    assert layout.queries_per_window == (1, 2, 1)
    rows, cols = layout.window_patches(0, 3)  # bottom-right 3x5 window
    assert (rows, cols) == (range(3, 6), range(5, 10))
    rows, cols = layout.window_patches(1, 4)
    assert (rows, cols) == (range(0, 6), range(8, 10))


def test_tables_match_enumeration():
    layout = random_layout(seeded_rng())
    t = layout.tables("cpu")
    gh, gw = layout.grid
    # Enumerate windows and queries directly from the definition.
    q = 0
    wid = 0
    for s, ((wh, ww), n) in enumerate(zip(layout.windows, layout.queries)):
        nwin = (gh // wh) * (gw // ww)
        for w in range(nwin):
            r, c = w // (gw // ww), w % (gw // ww)
            assert t.window_scale[wid] == s
            assert (t.window_row0[wid], t.window_col0[wid]) == (r * wh, c * ww)
            assert (t.window_height[wid], t.window_width[wid]) == (wh, ww)
            assert t.window_q_start[wid] == q and t.window_q_count[wid] == n // nwin
            for _ in range(n // nwin):
                assert t.query_scale[q] == s and t.query_window[q] == wid
                q += 1
            wid += 1
    assert q == layout.total_queries == t.query_scale.numel()
    assert all(v.dtype == torch.int32 for v in vars(t).values())


def test_tables_cached_per_device():
    layout = WindowLayout(8, [4], [8])
    assert layout.tables("cpu") is layout.tables(torch.device("cpu"))


def test_spec_round_trip_and_equality():
    layout = random_layout(seeded_rng())
    again = WindowLayout.from_spec(layout.to_spec())
    assert again == layout and hash(again) == hash(layout)
    assert WindowLayout(8, [4], [4]) != WindowLayout(8, [4], [8])
    assert "WindowLayout(grid=" in repr(layout)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((16, [5], [16]), ValueError, r"windows\[0\] = \(5, 5\) does not tile the grid"),
        (((16, 12), [(4, 5)], [16]), ValueError, r"does not tile the grid \(16, 12\)"),
        ((16, [16, 4], [16, 30]), ValueError, r"queries\[1\] = 30 is not divisible by the scale's 16 windows"),
        ((16, [16, 4], [16]), ValueError, "one entry per scale"),
        ((16, [], []), ValueError, "at least one scale"),
        ((0, [4], [4]), ValueError, "grid must be a positive integer, got 0"),
        ((-16, [4], [4]), ValueError, "grid must be a positive integer"),
        ((16.0, [4], [16]), TypeError, r"grid must be a positive integer, got 16.0"),
        ((16, [4.0], [16]), TypeError, r"windows\[0\] must be a positive integer"),
        ((16, [4], [16.5]), TypeError, r"queries\[0\] must be a positive integer"),
        ((16, [4], [0]), ValueError, r"queries\[0\] must be a positive integer, got 0"),
        ((16, [True], [16]), TypeError, "positive integer"),
        ((16, [(4, 4, 4)], [16]), ValueError, r"windows\[0\] must be an int or a pair"),
        ((16, 4, [16]), TypeError, "must be lists"),
    ],
)
def test_errors(args, error, match):
    with pytest.raises(error, match=match):
        WindowLayout(*args)
