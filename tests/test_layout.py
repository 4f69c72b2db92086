"""WindowLayout: arithmetic, spec round trip, size bounds and every input error."""

import time

import pytest
from oracle import random_layout, seeded_rng

from cos_kernels import WindowLayout
from cos_kernels.layout import MAX_TABLE_SIZE


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


def test_spec_round_trip_and_equality():
    layout = random_layout(seeded_rng())
    again = WindowLayout.from_spec(layout.to_spec())
    assert again == layout and hash(again) == hash(layout)
    assert WindowLayout(8, [4], [4]) != WindowLayout(8, [4], [8])
    assert "WindowLayout(grid=" in repr(layout)


@pytest.mark.parametrize(
    "spec, match",
    [
        ([16.7, 16, 16, 16, 16], r"layout spec\[0\] must be an integer, got 16.7 \(float\)"),
        ([16, 16, 16.0, 16, 16], r"layout spec\[2\] must be an integer, got 16.0 \(float\)"),
        ([16, 16, 16, 16, True], r"layout spec\[4\] must be an integer, got True \(bool\)"),
        ([16, 16, 16, 16, "16"], r"layout spec\[4\] must be an integer, got '16' \(str\)"),
    ],
)
def test_from_spec_refuses_non_integers(spec, match):
    with pytest.raises(TypeError, match=match):
        WindowLayout.from_spec(spec)


def test_from_spec_accepts_numpy_integers():
    np = pytest.importorskip("numpy")
    spec = np.array([16, 16, 16, 16, 16, 4, 4, 64])
    assert WindowLayout.from_spec(spec) == WindowLayout(16, [16, 4], [16, 64])


@pytest.mark.parametrize(
    "args, match",
    [
        ((10**5, [1], [10**10]), r"num_patches = 10000000000 \(grid \(100000, 100000\)\) exceeds the bound 16777216"),
        ((4096, [1, 1], [4096**2] * 2), r"total_windows = 33554432 .* exceeds the bound 16777216 \(2\*\*24\)"),
        ((16, [16], [2**24 + 1]), r"total_queries = 16777217 .* exceeds the bound 16777216 \(2\*\*24\) of the kernels' int32"),
    ],
)
def test_size_bound(args, match):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        WindowLayout(*args)
    assert time.perf_counter() - start < 1.0
    assert MAX_TABLE_SIZE == 2**24


def test_size_bound_is_inclusive():
    layout = WindowLayout(4096, [4096], [2**24])  # 2**24 patches and queries: allowed
    assert layout.num_patches == layout.total_queries == MAX_TABLE_SIZE


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
