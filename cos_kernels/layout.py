"""WindowLayout: the geometry of every scale of a multi-scale windowed cross-attention.

A layout is a patch grid (GH, GW) in raster order and, per scale s, a window shape (wh_s, ww_s) that
tiles the grid without overlap, plus the scale's total number of learnable queries n_s, split evenly
over its windows. Queries are ordered scale 0 first; inside a scale, windows in raster order over the
window grid; each window's queries contiguous.

Pure geometry, in plain Python: each fused backend builds its own tile tables from it.
"""

from __future__ import annotations

import functools
from typing import Sequence

from .validation import is_integer, pair, positive_int

__all__ = ["WindowLayout", "MAX_TABLE_SIZE"]

MAX_TABLE_SIZE = 2**24
"""Bound on a layout's patches, total windows and total queries: the fused backends' tile tables hold
them as int32, and building those tables stays fast."""


def _check_size(what: str, value: int, detail: str) -> None:
    if value > MAX_TABLE_SIZE:
        raise ValueError(
            f"{what} = {value} ({detail}) exceeds the bound {MAX_TABLE_SIZE} (2**24) of the kernels' "
            f"int32 tile tables"
        )


class WindowLayout:
    """Geometry of all scales.

    Args:
        grid: patch grid, an int (square) or (GH, GW).
        windows: per scale, the window side: an int (square) or (wh, ww); each side divides the grid's.
        queries: per scale, the total number of queries; divisible by the scale's number of windows.

    The number of patches, the total windows and the total queries are each at most MAX_TABLE_SIZE
    (2**24): the kernels' tile tables hold them as int32. A bad argument raises TypeError or
    ValueError naming it.

    Attributes:
        grid: (GH, GW); windows: per scale (wh, ww); queries: per scale n_s (tuples of ints).
        The properties derive the rest: num_scales S, num_patches N = GH * GW, total_queries Q,
        windows_per_scale, queries_per_window, query_offsets and window_offsets.

    Example: ``WindowLayout(16, [16, 4], [16, 64])`` is one 16x16 window with 16 queries plus sixteen
    4x4 windows with 4 queries each: 80 queries.
    """

    def __init__(self, grid, windows: Sequence, queries: Sequence[int]):
        self.grid = pair(grid, "grid")
        if not isinstance(windows, (list, tuple)) or not isinstance(queries, (list, tuple)):
            raise TypeError(
                f"windows and queries must be lists (one entry per scale), got "
                f"windows={windows!r} and queries={queries!r}"
            )
        if len(windows) == 0:
            raise ValueError("windows must name at least one scale, got []")
        if len(windows) != len(queries):
            raise ValueError(
                f"windows and queries must have one entry per scale, got {len(windows)} windows "
                f"{list(windows)!r} and {len(queries)} queries {list(queries)!r}"
            )
        gh, gw = self.grid
        _check_size("num_patches", gh * gw, f"grid {self.grid}")
        self.windows: tuple[tuple[int, int], ...] = tuple(
            pair(w, f"windows[{s}]") for s, w in enumerate(windows)
        )
        self.queries: tuple[int, ...] = tuple(
            positive_int(n, f"queries[{s}]") for s, n in enumerate(queries)
        )
        for s, (wh, ww) in enumerate(self.windows):
            if gh % wh or gw % ww:
                raise ValueError(
                    f"windows[{s}] = ({wh}, {ww}) does not tile the grid ({gh}, {gw}): each window "
                    f"side must divide the grid side"
                )
        _check_size("total_windows", self.total_windows, f"windows per scale {self.windows_per_scale}")
        _check_size("total_queries", self.total_queries, f"queries {self.queries}")
        for s, n in enumerate(self.queries):
            nw = self.windows_per_scale[s]
            if n % nw:
                raise ValueError(
                    f"queries[{s}] = {n} is not divisible by the scale's {nw} windows "
                    f"(window {self.windows[s]} on grid {self.grid})"
                )

    # ---- arithmetic -------------------------------------------------------------------------
    @property
    def num_scales(self) -> int:
        return len(self.windows)

    @property
    def num_patches(self) -> int:
        """N = GH * GW."""
        return self.grid[0] * self.grid[1]

    @property
    def window_grids(self) -> tuple[tuple[int, int], ...]:
        """Per scale, the number of window rows and columns."""
        return tuple((self.grid[0] // wh, self.grid[1] // ww) for wh, ww in self.windows)

    @property
    def windows_per_scale(self) -> tuple[int, ...]:
        return tuple(r * c for r, c in self.window_grids)

    @property
    def patches_per_window(self) -> tuple[int, ...]:
        return tuple(wh * ww for wh, ww in self.windows)

    @property
    def queries_per_window(self) -> tuple[int, ...]:
        return tuple(n // nw for n, nw in zip(self.queries, self.windows_per_scale))

    @property
    def total_queries(self) -> int:
        return sum(self.queries)

    @property
    def total_windows(self) -> int:
        return sum(self.windows_per_scale)

    @property
    def query_offsets(self) -> tuple[int, ...]:
        """Per scale, the index of its first query; one more entry, total_queries, at the end."""
        offsets = [0]
        for n in self.queries:
            offsets.append(offsets[-1] + n)
        return tuple(offsets)

    @property
    def window_offsets(self) -> tuple[int, ...]:
        """Per scale, the global id of its first window; one more entry, total_windows, at the end."""
        offsets = [0]
        for nw in self.windows_per_scale:
            offsets.append(offsets[-1] + nw)
        return tuple(offsets)

    def window_patches(self, scale: int, window: int) -> tuple[range, range]:
        """Patch rows and columns of window ``window`` (raster index inside the scale) of ``scale``."""
        wh, ww = self.windows[scale]
        r, c = divmod(window, self.window_grids[scale][1])
        return range(r * wh, (r + 1) * wh), range(c * ww, (c + 1) * ww)

    # ---- identity ---------------------------------------------------------------------------
    def to_spec(self) -> tuple[int, ...]:
        """Flat integers (GH, GW, wh_0, ww_0, n_0, wh_1, ...): how the layout crosses a custom op."""
        spec = list(self.grid)
        for (wh, ww), n in zip(self.windows, self.queries):
            spec += [wh, ww, n]
        return tuple(spec)

    @staticmethod
    def from_spec(spec: Sequence[int]) -> "WindowLayout":
        """The layout of ``to_spec``'s flat integers (ints only: 16.0 or 16.7 is refused)."""
        spec = tuple(spec)
        for i, x in enumerate(spec):
            if not is_integer(x):
                raise TypeError(
                    f"layout spec[{i}] must be an integer, got {x!r} ({type(x).__name__}) in spec {spec!r}"
                )
        return _layout_from_spec(tuple(int(x) for x in spec))

    def __eq__(self, other) -> bool:
        return isinstance(other, WindowLayout) and self.to_spec() == other.to_spec()

    def __hash__(self) -> int:
        return hash(self.to_spec())

    def __repr__(self) -> str:
        wins = [w[0] if w[0] == w[1] else list(w) for w in self.windows]
        grid = self.grid[0] if self.grid[0] == self.grid[1] else list(self.grid)
        return f"WindowLayout(grid={grid}, windows={wins}, queries={list(self.queries)})"


@functools.lru_cache(maxsize=256)
def _layout_from_spec(spec: tuple[int, ...]) -> WindowLayout:
    if len(spec) < 5 or (len(spec) - 2) % 3:
        raise ValueError(f"a layout spec is (GH, GW, wh, ww, n, ...), got {spec!r}")
    body = spec[2:]
    windows = [tuple(body[i : i + 2]) for i in range(0, len(body), 3)]
    queries = [body[i + 2] for i in range(0, len(body), 3)]
    return WindowLayout(spec[:2], windows, queries)
