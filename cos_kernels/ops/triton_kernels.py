"""Triton kernels of the multi-scale windowed cross-attention: one forward, two backward launches.

Every program works on one (tile, batch image, head); its tile is a row of the tables of
``triton_tiles`` (columns ``QueryTileField`` / ``KeyTileField``). A query tile's keys (forward, dQ)
are the union of its windows, enumerated as key slots j = local_window * P + patch_in_window
(P = wh * ww) and visited ``BLOCK_N`` slots at a time; a score is kept only where the query's local
window equals the key's (the in-tile window mask). A key tile (dK, dV) holds ``BLOCK_N`` key slots of
consecutive windows of one scale and iterates over all the queries of those windows, ``BLOCK_M`` at a
time.

K and V are read in place through all five strides; every offset is formed in int64.
Scores are kept in base 2: s2 = (q . k) * softmax_scale * log2(e); the saved logsumexp is natural.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_tiles import KeyTileField, QueryTileField

# The tables' columns as constexprs (the only globals a kernel may read), in the fields' order
QUERY_TILE_FIELDS, KEY_TILE_FIELDS = tl.constexpr(len(QueryTileField)), tl.constexpr(len(KeyTileField))  # row strides
QT_Q_START, QT_ROWS, QT_QPW, QT_Q_PHASE, QT_SCALE, QT_WH, QT_WW, QT_WIN_COLS, QT_WIN0, QT_NKEYS = (
    tl.constexpr(int(field)) for field in QueryTileField)
KT_K_BEGIN, KT_K_COUNT, KT_Q_START, KT_Q_TOTAL, KT_QPW, KT_SCALE, KT_WH, KT_WW, KT_WIN_COLS, KT_WIN0 = (
    tl.constexpr(int(field)) for field in KeyTileField)


@triton.jit
def _loop_end(n):
    """The end of a ``range`` over a runtime scalar ``n``: ``n`` itself (inlined: compiled kernels
    are unchanged). Under the interpreter it is replaced by the plain function below."""
    return n


if type(_loop_end).__name__ == "InterpretedFunction":  # TRITON_INTERPRET=1 when triton.jit ran

    def _loop_end(n):  # noqa: F811
        """Interpreter: ``n`` as a Python int, since the interpreter holds every scalar as a 1-element
        array, which ``range`` cannot take on every NumPy (benchmarks/NOTES.md: which versions). Call
        it inside the ``range(...)``: the interpreter turns an assigned value back into a tensor."""
        return n.handle.data.item()


@triton.jit
def _key_slots(j, nkeys, P, wh, ww, win0, win_cols, grid_w):
    """Key slots j (int32 vector) of a window group -> (local window, patch index, valid)."""
    valid = j < nkeys
    lw = j // P
    pp = j - lw * P
    py = pp // ww
    px = pp - py * ww
    wi = win0 + lw
    r = wi // win_cols
    c = wi - r * win_cols
    patch = (r * wh + py) * grid_w + c * ww + px
    return lw, patch, valid


@triton.jit
def _program(num_bh, num_heads):
    """This program's (tile, b * H + h, b, h) in a tile-major grid over (tile, batch image, head);
    b and h as int64."""
    pid = tl.program_id(0)
    tile = pid // num_bh
    bh = pid - tile * num_bh
    b = bh // num_heads
    h = bh - b * num_heads
    return tile, bh, b.to(tl.int64), h.to(tl.int64)


@triton.jit
def _query_tile_rows(TILES, tile, BLOCK_M: tl.constexpr):
    """Row ``tile`` of the query-tile table -> for each of the BLOCK_M rows its query index (int64),
    whether it is valid and its local window; then the keys' scale (int64), wh, ww, win_cols, win0
    and nkeys."""
    t = TILES + tile * QUERY_TILE_FIELDS
    q_start = tl.load(t + QT_Q_START)
    rows = tl.load(t + QT_ROWS)
    qpw = tl.load(t + QT_QPW)
    q_phase = tl.load(t + QT_Q_PHASE)
    s = tl.load(t + QT_SCALE)
    wh = tl.load(t + QT_WH)
    ww = tl.load(t + QT_WW)
    win_cols = tl.load(t + QT_WIN_COLS)
    win0 = tl.load(t + QT_WIN0)
    nkeys = tl.load(t + QT_NKEYS)
    offs_m = tl.arange(0, BLOCK_M)
    qrow = (q_start + offs_m).to(tl.int64)
    row_ok = offs_m < rows
    q_win = (q_phase + offs_m) // qpw
    return qrow, row_ok, q_win, s.to(tl.int64), wh, ww, win_cols, win0, nkeys


@triton.jit
def _load_key_block(k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                    j, nkeys, P, wh, ww, win0, win_cols, grid_w, offs_d, d_ok):
    """K and V rows (BLOCK_N, BLOCK_D) of the key slots j of a window group, zero where invalid ->
    (local window, valid, k, v) of each slot. k_base, v_base: K and V at (b, s, 0, h, 0)."""
    lw, patch, k_ok = _key_slots(j, nkeys, P, wh, ww, win0, win_cols, grid_w)
    p64 = patch.to(tl.int64)
    kv_mask = k_ok[:, None] & d_ok[None, :]
    kk = tl.load(k_base + p64[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    vv = tl.load(v_base + p64[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    return lw, k_ok, kk, vv


@triton.jit
def window_attention_fwd_kernel(
    Q, K, V, O, LSE, TILES,
    stride_qb, stride_qq, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_oq, stride_oh,
    num_heads, num_bh, total_q, grid_w,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Forward. Grid: (num_query_tiles * B * H,), tile-major (tiles sorted longest first).

    Q (B, Q, H, D), K/V (B, S, N, H, D) any strides -> O (B, Q, H, D) with unit stride on D,
    LSE (B, H, Q) fp32 contiguous. qk_scale = softmax_scale * log2(e).
    """
    tile, bh, b64, h64 = _program(num_bh, num_heads)
    qrow, row_ok, q_win, s64, wh, ww, win_cols, win0, nkeys = _query_tile_rows(TILES, tile, BLOCK_M)
    P = wh * ww
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q = tl.load(
        Q + b64 * stride_qb + h64 * stride_qh + qrow[:, None] * stride_qq + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_base = K + b64 * stride_kb + s64 * stride_ks + h64 * stride_kh
    v_base = V + b64 * stride_vb + s64 * stride_vs + h64 * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, _loop_end(nkeys), BLOCK_N):
        lw, k_ok, kk, vv = _load_key_block(k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                           start + tl.arange(0, BLOCK_N), nkeys, P, wh, ww, win0, win_cols,
                                           grid_w, offs_d, d_ok)
        sc = tl.dot(q, tl.trans(kk), input_precision=DOT_PRECISION) * qk_scale
        allowed = (q_win[:, None] == lw[None, :]) & k_ok[None, :]
        sc = tl.where(allowed, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        # a row may see no key of its window in this block: keep its running state unchanged
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(row_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        O + b64 * stride_ob + h64 * stride_oh + qrow[:, None] * stride_oq + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    m_safe = tl.where(row_ok, m_i, 0.0)
    lse = (m_safe + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * total_q + qrow, lse, mask=row_ok)


@triton.jit
def window_attention_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, TILES,
    stride_qb, stride_qq, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_oq, stride_oh, stride_od,
    stride_dob, stride_doq, stride_doh, stride_dod,
    stride_dqb, stride_dqq, stride_dqh,
    num_heads, num_bh, total_q, grid_w,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward launch 1: owns query tiles. Writes DELTA = rowsum(dO * O) (B, H, Q) fp32, which
    launch 2 reads, and DQ (B, Q, H, D) with unit stride on D. Grid as the forward's."""
    tile, bh, b64, h64 = _program(num_bh, num_heads)
    qrow, row_ok, q_win, s64, wh, ww, win_cols, win0, nkeys = _query_tile_rows(TILES, tile, BLOCK_M)
    P = wh * ww
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    qd_mask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(
        Q + b64 * stride_qb + h64 * stride_qh + qrow[:, None] * stride_qq + offs_d[None, :] * stride_qd,
        mask=qd_mask, other=0.0,
    )
    do = tl.load(
        DO + b64 * stride_dob + h64 * stride_doh + qrow[:, None] * stride_doq + offs_d[None, :] * stride_dod,
        mask=qd_mask, other=0.0,
    )
    o = tl.load(
        O + b64 * stride_ob + h64 * stride_oh + qrow[:, None] * stride_oq + offs_d[None, :] * stride_od,
        mask=qd_mask, other=0.0,
    )
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row_stat = bh.to(tl.int64) * total_q + qrow
    tl.store(DELTA + row_stat, delta, mask=row_ok)
    lse2 = tl.load(LSE + row_stat, mask=row_ok, other=0.0) * 1.4426950408889634

    k_base = K + b64 * stride_kb + s64 * stride_ks + h64 * stride_kh
    v_base = V + b64 * stride_vb + s64 * stride_vs + h64 * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, _loop_end(nkeys), BLOCK_N):
        lw, k_ok, kk, vv = _load_key_block(k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                           start + tl.arange(0, BLOCK_N), nkeys, P, wh, ww, win0, win_cols,
                                           grid_w, offs_d, d_ok)
        sc = tl.dot(q, tl.trans(kk), input_precision=DOT_PRECISION) * qk_scale
        allowed = (q_win[:, None] == lw[None, :]) & k_ok[None, :] & row_ok[:, None]
        sc = tl.where(allowed, sc, float("-inf"))
        p = tl.exp2(sc - lse2[:, None])
        dp = tl.dot(do, tl.trans(vv), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kk.dtype), kk, input_precision=DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(
        DQ + b64 * stride_dqb + h64 * stride_dqh + qrow[:, None] * stride_dqq + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=qd_mask,
    )


@triton.jit
def window_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KTILES,
    stride_qb, stride_qq, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_doq, stride_doh, stride_dod,
    stride_dkb, stride_dks, stride_dkn, stride_dkh,
    num_heads, num_bh, total_q, grid_w,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward launch 2: owns key tiles; for its BLOCK_N keys, iterates over the queries of their
    windows and writes DK, DV (B, S, N, H, D), both with the strides of DK and unit stride on D.
    Reads DELTA written by launch 1. Grid: (num_key_tiles * B * H,), tile-major."""
    tile, bh, b64, h64 = _program(num_bh, num_heads)
    t = KTILES + tile * KEY_TILE_FIELDS
    k_begin = tl.load(t + KT_K_BEGIN)
    k_count = tl.load(t + KT_K_COUNT)
    q_start = tl.load(t + KT_Q_START)
    q_total = tl.load(t + KT_Q_TOTAL)
    qpw = tl.load(t + KT_QPW)
    s = tl.load(t + KT_SCALE)
    wh = tl.load(t + KT_WH)
    ww = tl.load(t + KT_WW)
    win_cols = tl.load(t + KT_WIN_COLS)
    win0 = tl.load(t + KT_WIN0)
    P = wh * ww

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    s64 = s.to(tl.int64)

    j = k_begin + tl.arange(0, BLOCK_N)
    lw, patch, k_ok = _key_slots(j, k_begin + k_count, P, wh, ww, win0, win_cols, grid_w)
    p64 = patch.to(tl.int64)
    kv_mask = k_ok[:, None] & d_ok[None, :]
    kk = tl.load(
        K + b64 * stride_kb + s64 * stride_ks + h64 * stride_kh + p64[:, None] * stride_kn
        + offs_d[None, :] * stride_kd,
        mask=kv_mask, other=0.0,
    )
    vv = tl.load(
        V + b64 * stride_vb + s64 * stride_vs + h64 * stride_vh + p64[:, None] * stride_vn
        + offs_d[None, :] * stride_vd,
        mask=kv_mask, other=0.0,
    )

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = Q + b64 * stride_qb + h64 * stride_qh
    do_base = DO + b64 * stride_dob + h64 * stride_doh
    stat_base = bh.to(tl.int64) * total_q
    for m0 in range(0, _loop_end(q_total), BLOCK_M):
        mi = m0 + tl.arange(0, BLOCK_M)
        row_ok = mi < q_total
        q_win = mi // qpw
        qrow = (q_start + mi).to(tl.int64)
        qd_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + qrow[:, None] * stride_qq + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
        do = tl.load(do_base + qrow[:, None] * stride_doq + offs_d[None, :] * stride_dod, mask=qd_mask, other=0.0)
        lse2 = tl.load(LSE + stat_base + qrow, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + stat_base + qrow, mask=row_ok, other=0.0)
        sc = tl.dot(q, tl.trans(kk), input_precision=DOT_PRECISION) * qk_scale
        allowed = (q_win[:, None] == lw[None, :]) & row_ok[:, None] & k_ok[None, :]
        sc = tl.where(allowed, sc, float("-inf"))
        p = tl.exp2(sc - lse2[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(vv), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    dk = dk * sm_scale

    out_off = b64 * stride_dkb + s64 * stride_dks + h64 * stride_dkh + p64[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


__all__ = [
    "window_attention_fwd_kernel",
    "window_attention_bwd_dq_kernel",
    "window_attention_bwd_dkdv_kernel",
]
