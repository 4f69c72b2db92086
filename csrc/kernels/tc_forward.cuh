// Forward kernel on tensor cores (fp16 / bf16): one warp per (q-tile of 16 queries, batch, head).
//
// Q (16 rows x 16 G dims) is held as A fragments; the keys and values of the tile's windows are
// staged chunk by chunk (tc_common.cuh: cp.async, two buffers). Per 16-column step of a chunk:
// S = Q K^T (mma, K^T fragments by ldmatrix), scaled to the log2 domain and masked to the row's
// window, an online-softmax update of the row's max m and (per-lane partial) sum l, P = exp2(S - m)
// rounded to T as an A fragment, O += P V (V fragments by ldmatrix .trans). Writes out (T) and lse
// (fp32, natural log) once.
#pragma once

#include "tc_common.cuh"

namespace cos_kernels {
namespace detail {

template <typename T, int G>
__global__ void __launch_bounds__(32, 1) tc_forward_kernel(const FwdParams p) {
  constexpr int DPAD = G * kDimsPerThread, RS = DPAD + kTcRowPad;  // staged row stride (elements)
  COS_DYNAMIC_SMEM(smem_f);
  T* smem = reinterpret_cast<T*>(smem_f);
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  const BlockTile tile = block_tile(p.tiles, p.batch, p.heads);
  const TileInfo& ti = tile.t;
  const int b = tile.b, h = tile.h, D = p.head_dim;
  const int C = p.col_slots, cb = ti.cols_per_chunk;

  // This lane's two rows: queries of the tile (row g and g + 8).
  const RowPlace row[2] = {row_place(ti, g), row_place(ti, g + 8)};
  const int lw[2] = {row[0].lw, row[1].lw};
  const int qi[2] = {window_query(ti, ti.win0 + lw[0], row[0].j), window_query(ti, ti.win0 + lw[1], row[1].j)};
  uint32_t qa[G][4];
  load_a_rows<T, G>(qa, query_row<T>(p.q, p.q_stride, b, qi[0], h, row[0].active),
                    query_row<T>(p.q, p.q_stride, b, qi[1], h, row[1].active), p.q_stride[3], D, t);

  float o[2 * G][4];
  zero_frags(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  const int ncols = ti.num_win * cb;  // slots holding columns in every chunk
  for_each_kv_chunk<T, DPAD, RS>(smem, C, ncols, p, tile, lane, [&](const T* ks, const T* vs, int count) {
    for (int col0 = 0; col0 < ncols; col0 += 16) {
      float s[2][4] = {};
      mma_scores<T, G, RS>(s, qa, ks, col0, lane);
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          s[n][i] = tc_valid(col0, n, i, t, lw, cb, count) ? s[n][i] * p.scale_log2 : -INFINITY;
          mx[i >> 1] = fmaxf(mx[i >> 1], s[n][i]);
        }
      float alpha[2], base[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float m_new = fmaxf(m[r], quad_max(mx[r]));
        base[r] = m_new == -INFINITY ? 0.f : m_new;  // no column of the row yet: p = 0, nothing to rescale
        alpha[r] = exp2f(m[r] - base[r]);
        m[r] = m_new;
        l[r] *= alpha[r];
      }
#pragma unroll
      for (int n = 0; n < 2 * G; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[n][i] *= alpha[i >> 1];
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          s[n][i] = exp2f(s[n][i] - base[i >> 1]);
          l[i >> 1] += s[n][i];
        }
      uint32_t pa[4];
      pack_a<T>(pa, s[0], s[1]);
      mma_rows<T, G, RS>(o, pa, vs, col0, lane);
    }
  });

  // out = O / l (the two rows have their own l), lse = ln(2) (m + log2 l).
  T* orow[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = quad_sum(l[r]);
    const float inv = 1.f / l[r];
#pragma unroll
    for (int n = 0; n < 2 * G; ++n) {
      o[n][2 * r] *= inv;
      o[n][2 * r + 1] *= inv;
    }
    orow[r] = row[r].active ? static_cast<T*>(p.out) + out_row(p, b, qi[r], h) * D : nullptr;
    if (t == 0 && row[r].active) p.lse[stat_index(p, tile.bh, qi[r])] = (m[r] + log2f(l[r])) * kLn2;
  }
  store_c_rows<T, G>(orow[0], orow[1], o, 1.f, D, t);
}

}  // namespace detail
}  // namespace cos_kernels
