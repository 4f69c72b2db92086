"""WindowLayout: arithmetic, index tables against a direct enumeration, and every input error."""

import pytest
import torch

import time

from cos_kernels import WindowLayout
from cos_kernels.layout import MAX_TABLE_SIZE, LayoutTables
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


def loop_tables(layout):
    """The index tables enumerated window by window in plain Python: {name: list of ints}."""
    cols = {name: [] for name in LayoutTables.__dataclass_fields__}
    wid = 0
    for s in range(layout.num_scales):
        qpw = layout.queries_per_window[s]
        for w in range(layout.windows_per_scale[s]):
            rows, columns = layout.window_patches(s, w)
            cols["window_scale"].append(s)
            cols["window_row0"].append(rows.start)
            cols["window_col0"].append(columns.start)
            cols["window_height"].append(len(rows))
            cols["window_width"].append(len(columns))
            cols["window_q_start"].append(layout.query_offsets[s] + w * qpw)
            cols["window_q_count"].append(qpw)
            cols["query_scale"] += [s] * qpw
            cols["query_window"] += [wid] * qpw
            wid += 1
    return cols


@pytest.mark.parametrize(
    "args",
    [
        (16, [16, 4], [16, 64]),
        (32, [32, 8, 2], [16, 256, 1024]),
        ((6, 10), [(3, 5), (6, 2), 1], [4, 10, 60]),
        ((4, 6), [(4, 6), 2, (1, 3)], [3, 12, 16]),
        ((2, 8), [(2, 8)], [1]),
        None,  # a random layout
    ],
)
def test_vectorised_tables_match_loop(args):
    layout = random_layout(seeded_rng()) if args is None else WindowLayout(*args)
    t = layout.tables("cpu")
    for name, want in loop_tables(layout).items():
        got = getattr(t, name)
        assert got.dtype == torch.int32 and got.device.type == "cpu", name
        assert got.tolist() == want, f"{name} for {layout}"


def test_tables_built_on_cpu_under_another_default_device():
    layout = WindowLayout((4, 6), [(4, 6), 2], [3, 12])
    with torch.device("meta"):
        t = layout.tables("cpu")
    assert t.query_window.tolist() == loop_tables(layout)["query_window"]


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
        ((16, [16], [2**24 + 1]), r"total_queries = 16777217 .* exceeds the bound 16777216 \(2\*\*24\) of a layout's int32"),
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
