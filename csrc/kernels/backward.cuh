// Backward kernels, deterministic and free of atomics: every output element has exactly one owner.
//
//   P = exp(scale * q.k - lse),  delta_i = sum_d dO_i * O_i,
//   dV_j = sum_i P_ij dO_i,  dS_ij = P_ij (dO_i . v_j - delta_i),
//   dQ_i = scale * sum_j dS_ij k_j,  dK_j = scale * sum_i dS_ij q_i   (i, j of the same window).
//
// 1. dQ kernel over the q-tiles (the forward's tiling): a row owns a query; it computes delta (and
//    writes it for step 2), streams its windows' K and V through shared memory and accumulates dQ.
// 2. dK/dV kernel over the k-tiles: a row owns a key (patch of one scale); it streams the queries of
//    its windows (q, dO, lse, delta) through shared memory and accumulates dK and dV.
// Both read q, k, v, out and grad_out in place through their strides; sums run in a fixed order.
#pragma once

#include "common.cuh"

namespace cos_kernels {
namespace detail {

// The dot products of one group of kBwdKeyGroup shared-memory rows, jg .. jg + kBwdKeyGroup - 1 (rows
// from `count` on give 0): x[jj] = a . arows[jg + jj] and x[kBwdKeyGroup + jj] = c . crows[jg + jj],
// summed over the row's G threads. Both kernels take the scores (log2 domain) and dO . v this way.
template <int G, int DPAD>
COS_DEVICE void group_dots(float (&x)[2 * kBwdKeyGroup], const float (&a)[kDimsPerThread], const float* arows,
                           const float (&c)[kDimsPerThread], const float* crows, int jg, int count, int g) {
#pragma unroll
  for (int jj = 0; jj < kBwdKeyGroup; ++jj) {
    const bool valid = jg + jj < count;
    x[jj] = valid ? dot_slice<G>(a, arows + (jg + jj) * DPAD, g) : 0.f;
    x[kBwdKeyGroup + jj] = valid ? dot_slice<G>(c, crows + (jg + jj) * DPAD, g) : 0.f;
  }
  group_sum<G, 2 * kBwdKeyGroup>(x);
}

template <typename T, int G>
__global__ void __launch_bounds__(kMaxThreads) window_attention_dq_kernel(const BwdParams p) {
  constexpr int DPAD = G * kDimsPerThread;
  COS_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const TileRow r = tile_row(p.q_tiles, p.batch, p.heads, tid / G);
  const int g = tid % G;
  const TileInfo& t = r.t;
  const int b = r.b, h = r.h, lw = r.lw;
  const bool active = r.active;
  const int D = p.head_dim;

  const int qi = window_query(t, t.win0 + lw, r.j);
  const int64_t lse_idx = stat_index(p, r.bh, qi);

  float qr[kDimsPerThread], dor[kDimsPerThread], dq[kDimsPerThread];
  float partial = 0.f, lse2 = 0.f;
  if (active) {
    const T* qrow = query_row<T>(p.q, p.q_stride, b, qi, h, true);
    const T* orow = query_row<T>(p.out, p.o_stride, b, qi, h, true);
    const T* dorow = query_row<T>(p.grad_out, p.do_stride, b, qi, h, true);
    load_slice<T, G>(qr, qrow, p.q_stride[3], D, g, p.q_vec != 0, p.scale_log2);
    load_slice<T, G>(dor, dorow, p.do_stride[3], D, g, p.do_vec != 0, 1.f);
    load_slice<T, G>(dq, orow, p.o_stride[3], D, g, p.o_vec != 0, 1.f);  // dq holds O for a moment
#pragma unroll
    for (int i = 0; i < kDimsPerThread; ++i) partial = fmaf(dor[i], dq[i], partial);
    lse2 = p.lse[lse_idx] * kLog2e;
  } else {
#pragma unroll
    for (int i = 0; i < kDimsPerThread; ++i) qr[i] = dor[i] = 0.f;
  }
  const float delta = group_sum1<G>(partial);
  if (active && g == 0) p.delta[lse_idx] = delta;
#pragma unroll
  for (int i = 0; i < kDimsPerThread; ++i) dq[i] = 0.f;

  float* ks = smem;
  float* vs = smem + p.q_col_slots * DPAD;
  zero_padding<DPAD>(smem, 2 * p.q_col_slots, D, tid, nthreads);

  const T* kbase = kv_head<T>(p.k, p.k_stride, b, t.scale, h);
  const T* vbase = kv_head<T>(p.v, p.v_stride, b, t.scale, h);
  const int cb = t.cols_per_chunk;
  const float* krow0 = ks + lw * cb * DPAD;
  const float* vrow0 = vs + lw * cb * DPAD;

  for (int j0 = 0; j0 < t.cols_per_win; j0 += cb) {
    const int count = imin(cb, t.cols_per_win - j0);
    __syncthreads();
    load_kv_chunk<T, DPAD>(ks, vs, kbase, vbase, p, t, j0, count, D, tid, nthreads);
    __syncthreads();

    for (int jg = 0; jg < count; jg += kBwdKeyGroup) {
      float x[2 * kBwdKeyGroup];  // scores (log2 domain), then dO . v
      group_dots<G, DPAD>(x, qr, krow0, dor, vrow0, jg, count, g);
#pragma unroll
      for (int jj = 0; jj < kBwdKeyGroup; ++jj) {
        if (jg + jj < count) {
          const float pj = active ? exp2f(x[jj] - lse2) : 0.f;
          const float ds = pj * (x[kBwdKeyGroup + jj] - delta);
          axpy_slice<G>(dq, ds, krow0 + (jg + jj) * DPAD, g);
        }
      }
    }
  }

  if (active) {
    store_slice<T, G>(static_cast<T*>(p.dq) + out_row(p, b, qi, h) * D, dq, D, g, p.dq_vec != 0, p.scale);
  }
}

template <typename T, int G>
__global__ void __launch_bounds__(kMaxThreads) window_attention_dkv_kernel(const BwdParams p) {
  constexpr int DPAD = G * kDimsPerThread;
  COS_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const TileRow r = tile_row(p.k_tiles, p.batch, p.heads, tid / G);
  const int g = tid % G;
  const TileInfo& t = r.t;
  const int b = r.b, h = r.h, lw = r.lw;
  const bool active = r.active;
  const int D = p.head_dim;

  // This row's key: patch r.j of window (win0 + lw) of the tile's scale.
  const int patch = window_patch(t, t.win0 + lw, r.j, p.grid_w);

  float kr[kDimsPerThread], vr[kDimsPerThread], dk[kDimsPerThread], dv[kDimsPerThread];
  if (active) {
    const T* krow = kv_head<T>(p.k, p.k_stride, b, t.scale, h) + patch * p.k_stride[2];
    const T* vrow = kv_head<T>(p.v, p.v_stride, b, t.scale, h) + patch * p.v_stride[2];
    load_slice<T, G>(kr, krow, p.k_stride[4], D, g, p.kv_vec != 0, p.scale_log2);
    load_slice<T, G>(vr, vrow, p.v_stride[4], D, g, p.kv_vec != 0, 1.f);
  } else {
#pragma unroll
    for (int i = 0; i < kDimsPerThread; ++i) kr[i] = vr[i] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < kDimsPerThread; ++i) dk[i] = dv[i] = 0.f;

  const int slots = p.k_col_slots;
  float* qs = smem;
  float* dos = smem + slots * DPAD;
  float* l2s = smem + 2 * slots * DPAD;
  float* dls = l2s + slots;
  zero_padding<DPAD>(smem, 2 * slots, D, tid, nthreads);

  const T* qbase = query_row<T>(p.q, p.q_stride, b, 0, h, true);
  const T* dobase = query_row<T>(p.grad_out, p.do_stride, b, 0, h, true);
  const float* lse_bh = p.lse + stat_index(p, r.bh, 0);
  const float* delta_bh = p.delta + stat_index(p, r.bh, 0);
  const int cb = t.cols_per_chunk;
  const float* qrow0 = qs + lw * cb * DPAD;
  const float* dorow0 = dos + lw * cb * DPAD;
  const float* l2row = l2s + lw * cb;
  const float* dlrow = dls + lw * cb;

  for (int j0 = 0; j0 < t.cols_per_win; j0 += cb) {
    const int count = imin(cb, t.cols_per_win - j0);
    __syncthreads();
    load_rows<T, DPAD>(
        qs, qbase, p.q_stride[3],
        [&](int w, int jj) { return window_query(t, t.win0 + w, j0 + jj) * p.q_stride[1]; }, t.num_win, cb, count,
        D, p.q_vec != 0, tid, nthreads);
    load_rows<T, DPAD>(
        dos, dobase, p.do_stride[3],
        [&](int w, int jj) { return window_query(t, t.win0 + w, j0 + jj) * p.do_stride[1]; }, t.num_win, cb,
        count, D, p.do_vec != 0, tid, nthreads);
    for (int i = tid; i < t.num_win * count; i += nthreads) {
      const int w = i / count, jj = i - w * count;
      const int qi = window_query(t, t.win0 + w, j0 + jj);
      l2s[w * cb + jj] = lse_bh[qi] * kLog2e;
      dls[w * cb + jj] = delta_bh[qi];
    }
    __syncthreads();

    for (int jg = 0; jg < count; jg += kBwdKeyGroup) {
      float x[2 * kBwdKeyGroup];  // scores (log2 domain), then dO . v
      group_dots<G, DPAD>(x, kr, qrow0, vr, dorow0, jg, count, g);
#pragma unroll
      for (int jj = 0; jj < kBwdKeyGroup; ++jj) {
        if (jg + jj < count) {
          const float pj = active ? exp2f(x[jj] - l2row[jg + jj]) : 0.f;
          axpy_slice<G>(dv, pj, dorow0 + (jg + jj) * DPAD, g);
          const float ds = pj * (x[kBwdKeyGroup + jj] - dlrow[jg + jj]);
          axpy_slice<G>(dk, ds, qrow0 + (jg + jj) * DPAD, g);
        }
      }
    }
  }

  if (active) {
    const int64_t krow =
        ((static_cast<int64_t>(b) * p.num_scales + t.scale) * p.num_patches + patch) * p.heads + h;
    store_slice<T, G>(static_cast<T*>(p.dk) + krow * D, dk, D, g, p.dkv_vec != 0, p.scale);
    store_slice<T, G>(static_cast<T*>(p.dv) + krow * D, dv, D, g, p.dkv_vec != 0, 1.f);
  }
}

}  // namespace detail
}  // namespace cos_kernels
