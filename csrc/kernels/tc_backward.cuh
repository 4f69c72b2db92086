// Backward kernels on tensor cores (fp16 / bf16), deterministic and free of atomics, as backward.cuh:
//
//   P = exp(scale * q.k - lse),  delta_i = sum_d dO_i * O_i,
//   dV_j = sum_i P_ij dO_i,  dS_ij = P_ij (dO_i . v_j - delta_i),
//   dQ_i = scale * sum_j dS_ij k_j,  dK_j = scale * sum_i dS_ij q_i   (i, j of the same window).
//
// 1. dQ kernel, one warp per q-tile (16 queries): Q and dO as A fragments, delta from dO and O in
//    fp32 (written for step 2); the tile's K and V staged chunk by chunk (tc_common.cuh). Per
//    16-column step: S = Q K^T and dP = dO V^T (ldmatrix of K and V rows), P and dS in fp32, then
//    dQ += dS K (dS rounded to T as an A fragment, K rows by ldmatrix .trans).
// 2. dK/dV kernel, one warp per k-tile (16 keys): K and V as A fragments; the tile's windows' queries
//    staged chunk by chunk (q and dO rows, lse and delta per slot). Per 16-query step: S^T = K Q^T,
//    dP^T = V dO^T, then dV += P^T dO and dK += dS^T Q.
// Every sum runs in a fixed order; each output element has one owner.
#pragma once

#include "tc_common.cuh"

namespace cos_kernels {
namespace detail {

template <typename T, int G>
__global__ void __launch_bounds__(32, 1) tc_dq_kernel(const BwdParams p) {
  constexpr int DPAD = G * kDimsPerThread, RS = DPAD + kTcRowPad;  // staged row stride (elements)
  COS_DYNAMIC_SMEM(smem_f);
  T* smem = reinterpret_cast<T*>(smem_f);
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  const BlockTile tile = block_tile(p.q_tiles, p.batch, p.heads);
  const TileInfo& ti = tile.t;
  const int b = tile.b, h = tile.h, D = p.head_dim;
  const int C = p.q_col_slots, cb = ti.cols_per_chunk;

  // This lane's two rows: queries of the tile (row g and g + 8).
  const RowPlace row[2] = {row_place(ti, g), row_place(ti, g + 8)};
  const int lw[2] = {row[0].lw, row[1].lw};
  const int qi[2] = {window_query(ti, ti.win0 + lw[0], row[0].j), window_query(ti, ti.win0 + lw[1], row[1].j)};
  auto load_rows = [&](uint32_t(&a)[G][4], const void* base, const int64_t(&stride)[4]) {  // A fragments
    load_a_rows<T, G>(a, query_row<T>(base, stride, b, qi[0], h, row[0].active),
                      query_row<T>(base, stride, b, qi[1], h, row[1].active), stride[3], D, t);
  };
  uint32_t qa[G][4], doa[G][4];
  load_rows(qa, p.q, p.q_stride);
  load_rows(doa, p.grad_out, p.do_stride);

  // delta = rowsum(dO * O) in fp32 over this lane's fragment dims, then over the row's 4 lanes.
  float delta[2] = {0.f, 0.f}, lse2[2] = {0.f, 0.f};
  {
    uint32_t oa[G][4];
    load_rows(oa, p.out, p.o_stride);
#pragma unroll
    for (int k = 0; k < G; ++k)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        delta[r & 1] = fmaf(unpack_lo<T>(doa[k][r]), unpack_lo<T>(oa[k][r]), delta[r & 1]);
        delta[r & 1] = fmaf(unpack_hi<T>(doa[k][r]), unpack_hi<T>(oa[k][r]), delta[r & 1]);
      }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    delta[r] = quad_sum(delta[r]);
    if (row[r].active) {
      const int64_t at = stat_index(p, tile.bh, qi[r]);
      lse2[r] = p.lse[at] * kLog2e;
      if (t == 0) p.delta[at] = delta[r];
    }
  }

  float dq[2 * G][4];
  zero_frags(dq);

  const int ncols = ti.num_win * cb;  // slots holding columns in every chunk
  for_each_kv_chunk<T, DPAD, RS>(smem, C, ncols, p, tile, lane, [&](const T* ks, const T* vs, int count) {
    for (int col0 = 0; col0 < ncols; col0 += 16) {
      float s[2][4] = {}, dp[2][4] = {};
      mma_scores<T, G, RS>(s, qa, ks, col0, lane);
      mma_scores<T, G, RS>(dp, doa, vs, col0, lane);
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = i >> 1;
          const float pij =
              tc_valid(col0, n, i, t, lw, cb, count) ? exp2f(s[n][i] * p.scale_log2 - lse2[r]) : 0.f;
          s[n][i] = row[r].active ? pij * (dp[n][i] - delta[r]) : 0.f;  // dS
        }
      uint32_t da[4];
      pack_a<T>(da, s[0], s[1]);
      mma_rows<T, G, RS>(dq, da, ks, col0, lane);
    }
  });

  T* dq_row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r)
    dq_row[r] = row[r].active ? static_cast<T*>(p.dq) + out_row(p, b, qi[r], h) * D : nullptr;
  store_c_rows<T, G>(dq_row[0], dq_row[1], dq, p.scale, D, t);
}

template <typename T, int G>
__global__ void __launch_bounds__(32, 1) tc_dkv_kernel(const BwdParams p) {
  constexpr int DPAD = G * kDimsPerThread, RS = DPAD + kTcRowPad;  // staged row stride (elements)
  COS_DYNAMIC_SMEM(smem_f);
  T* smem = reinterpret_cast<T*>(smem_f);
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  const BlockTile tile = block_tile(p.k_tiles, p.batch, p.heads);
  const TileInfo& ti = tile.t;
  const int b = tile.b, h = tile.h, D = p.head_dim;
  const int C = p.k_col_slots, cb = ti.cols_per_chunk;

  // This lane's two rows: keys (patch j of local window lw) of the tile.
  const RowPlace row[2] = {row_place(ti, g), row_place(ti, g + 8)};
  const int lw[2] = {row[0].lw, row[1].lw};
  int patch[2];
  const T *krow[2], *vrow[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    patch[r] = window_patch(ti, ti.win0 + row[r].lw, row[r].j, p.grid_w);
    const bool on = row[r].active;
    krow[r] = on ? kv_head<T>(p.k, p.k_stride, b, ti.scale, h) + patch[r] * p.k_stride[2] : nullptr;
    vrow[r] = on ? kv_head<T>(p.v, p.v_stride, b, ti.scale, h) + patch[r] * p.v_stride[2] : nullptr;
  }
  uint32_t ka[G][4], va[G][4];
  load_a_rows<T, G>(ka, krow[0], krow[1], p.k_stride[4], D, t);
  load_a_rows<T, G>(va, vrow[0], vrow[1], p.v_stride[4], D, t);

  float dk[2 * G][4], dv[2 * G][4];
  zero_frags(dk);
  zero_frags(dv);

  // Shared memory: buffer u holds q rows at smem + u * 2 C RS, dO rows after them; then, as fp32,
  // lse * log2(e) and delta of buffer u at stat + u * 2 C and + C.
  const size_t rows_bytes = static_cast<size_t>(4) * C * RS * sizeof(T);
  float* stat = reinterpret_cast<float*>(reinterpret_cast<char*>(smem) + rows_bytes);
  const int ncols = ti.num_win * cb;  // slots holding columns in every chunk
  tc_zero_unstaged<T, DPAD, RS>(smem, 4, C, ncols, D, lane);
  const T* qbase = query_row<T>(p.q, p.q_stride, b, 0, h, true);
  const T* dobase = query_row<T>(p.grad_out, p.do_stride, b, 0, h, true);
  const float* lse_bh = p.lse + stat_index(p, tile.bh, 0);
  const float* delta_bh = p.delta + stat_index(p, tile.bh, 0);
  auto stage = [&](int j0, int u) {
    const int count = imin(cb, ti.cols_per_win - j0);
    auto query = [&](int w, int jj) { return window_query(ti, ti.win0 + w, j0 + jj); };
    T* qs = smem + u * 2 * C * RS;
    stage_rows<T, DPAD, RS>(
        qs, qbase, p.q_stride[3], [&](int w, int jj) { return query(w, jj) * p.q_stride[1]; }, ti.num_win, cb,
        count, D, p.q_async != 0, lane);
    stage_rows<T, DPAD, RS>(
        qs + C * RS, dobase, p.do_stride[3], [&](int w, int jj) { return query(w, jj) * p.do_stride[1]; },
        ti.num_win, cb, count, D, p.do_async != 0, lane);
    float* l2s = stat + u * 2 * C;
    for (int i = lane; i < ti.num_win * count; i += 32) {
      const int w = i / count, jj = i - w * count;
      l2s[w * cb + jj] = lse_bh[query(w, jj)] * kLog2e;
      l2s[C + w * cb + jj] = delta_bh[query(w, jj)];
    }
  };
  for_each_chunk(ti, stage, [&](int u, int, int count) {
    const T* qs = smem + u * 2 * C * RS;
    const T* dos = qs + C * RS;
    const float* l2s = stat + u * 2 * C;
    for (int col0 = 0; col0 < ncols; col0 += 16) {
      float s[2][4] = {}, dpt[2][4] = {};
      mma_scores<T, G, RS>(s, ka, qs, col0, lane);
      mma_scores<T, G, RS>(dpt, va, dos, col0, lane);
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int c = col0 + 8 * n + 2 * t + (i & 1);
          const bool valid = row[i >> 1].active && tc_valid(col0, n, i, t, lw, cb, count);
          const float pij = valid ? exp2f(s[n][i] * p.scale_log2 - l2s[c]) : 0.f;
          s[n][i] = pij;                                             // P^T
          dpt[n][i] = valid ? pij * (dpt[n][i] - l2s[C + c]) : 0.f;  // dS^T
        }
      uint32_t pa[4], da[4];
      pack_a<T>(pa, s[0], s[1]);
      pack_a<T>(da, dpt[0], dpt[1]);
      mma_rows<T, G, RS>(dv, pa, dos, col0, lane);
      mma_rows<T, G, RS>(dk, da, qs, col0, lane);
    }
  });

  T *dk_row[2], *dv_row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t at =
        ((static_cast<int64_t>(b) * p.num_scales + ti.scale) * p.num_patches + patch[r]) * p.heads + h;
    dk_row[r] = row[r].active ? static_cast<T*>(p.dk) + at * D : nullptr;
    dv_row[r] = row[r].active ? static_cast<T*>(p.dv) + at * D : nullptr;
  }
  store_c_rows<T, G>(dk_row[0], dk_row[1], dk, p.scale, D, t);
  store_c_rows<T, G>(dv_row[0], dv_row[1], dv, 1.f, D, t);
}

}  // namespace detail
}  // namespace cos_kernels
