"""The triton backend's tile tables, in plain Python: which queries or keys each program covers.

One int32 row per tile; the columns are named by ``QueryTileField`` and ``KeyTileField`` (as csrc's
``enum TileField`` names the CUDA kernels'). triton_kernels.py says how the kernels walk a tile.
"""

from __future__ import annotations

from enum import IntEnum

from ..layout import WindowLayout

__all__ = ["QueryTileField", "KeyTileField", "query_tiles", "key_tiles"]


class QueryTileField(IntEnum):
    """Columns of a query tile (forward and dQ launches): a run of queries of one scale."""

    Q_START = 0  # index of the tile's first query (row 0)
    ROWS = 1  # valid rows (<= BLOCK_M)
    QPW = 2  # queries per window of the scale
    Q_PHASE = 3  # position of row 0 inside its window (0 for packed tiles)
    SCALE = 4  # the scale s (K/V slice k[:, s])
    WH = 5  # window height in patches
    WW = 6  # window width in patches
    WIN_COLS = 7  # windows per row of the scale's window grid
    WIN0 = 8  # raster index (inside the scale) of the tile's first window
    NKEYS = 9  # key slots of the tile: (number of windows) * WH * WW


class KeyTileField(IntEnum):
    """Columns of a key tile (dK/dV launch): key slots of consecutive windows of one scale."""

    K_BEGIN = 0  # first key slot (local window * WH * WW + patch in window)
    K_COUNT = 1  # valid key slots (<= BLOCK_N)
    Q_START = 2  # index of the first query of the tile's windows
    Q_TOTAL = 3  # queries of the tile's windows
    QPW = 4  # queries per window of the scale
    SCALE = 5  # the scale s
    WH = 6  # window height in patches
    WW = 7  # window width in patches
    WIN_COLS = 8  # windows per row of the scale's window grid
    WIN0 = 9  # raster index (inside the scale) of the tile's first window


def _window_runs(size: int, num_windows: int, block: int):
    """How a tile of ``block`` rows covers the windows of one scale, each window ``size`` rows (its
    queries, or its patches): as (first window, windows, first row inside the window, rows). Windows of
    at most ``block`` rows are packed ``block // size`` to a tile (from row 0); a larger window is cut
    into ``block``-row slices."""
    if size <= block:
        per = block // size
        for w0 in range(0, num_windows, per):
            n = min(per, num_windows - w0)
            yield w0, n, 0, n * size
    else:
        for w in range(num_windows):
            for first in range(0, size, block):
                yield w, 1, first, min(block, size - first)


def _row(fields: type[IntEnum], **values: int) -> list[int]:
    """One table row: ``values`` by field name (lower case), in the columns' order."""
    return [values[field.name.lower()] for field in fields]


def _scales(layout: WindowLayout):
    """Per scale: (the fields every tile of it shares, its windows, its first query, patches per window)."""
    for s in range(layout.num_scales):
        wh, ww = layout.windows[s]
        shared = dict(qpw=layout.queries_per_window[s], scale=s, wh=wh, ww=ww, win_cols=layout.window_grids[s][1])
        yield shared, layout.windows_per_scale[s], layout.query_offsets[s], wh * ww


def query_tiles(layout: WindowLayout, block_m: int) -> list[list[int]]:
    """Query-tile rows (``QueryTileField`` columns) for tiles of ``block_m`` rows, the most key slots
    (the longest program) first."""
    tiles = []
    for shared, num_windows, q0, patches in _scales(layout):
        qpw = shared["qpw"]
        for w0, n, phase, rows in _window_runs(qpw, num_windows, block_m):
            tiles.append(_row(QueryTileField, q_start=q0 + w0 * qpw + phase, rows=rows, q_phase=phase, win0=w0,
                              nkeys=n * patches, **shared))
    tiles.sort(key=lambda t: -t[QueryTileField.NKEYS])  # stable
    return tiles


def key_tiles(layout: WindowLayout, block_n: int) -> list[list[int]]:
    """Key-tile rows (``KeyTileField`` columns) for tiles of ``block_n`` key slots, the most queries
    to visit first."""
    tiles = []
    for shared, num_windows, q0, patches in _scales(layout):
        qpw = shared["qpw"]
        for w0, n, k_begin, k_count in _window_runs(patches, num_windows, block_n):
            tiles.append(_row(KeyTileField, k_begin=k_begin, k_count=k_count, q_start=q0 + w0 * qpw,
                              q_total=n * qpw, win0=w0, **shared))
    tiles.sort(key=lambda t: -t[KeyTileField.Q_TOTAL])  # stable
    return tiles
