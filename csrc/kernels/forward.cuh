// Forward kernel: one launch over (q-tile, batch, head) for every scale and window.
//
// Block = `rows` row groups of G threads; row i of the block is query r0 + i % rows_per_win of the
// tile's window i / rows_per_win. The keys and values of the tile's windows stream through shared
// memory (as fp32) in chunks of cols_per_chunk patches per window, read in place through the strides
// of k and v. Each row keeps its (pre-scaled) query slice, its output accumulator slice and the
// running max / sum of an online softmax in registers (log2 domain); writes out and lse once.
#pragma once

#include "common.cuh"

namespace cos_kernels {
namespace detail {

template <typename T, int G>
__global__ void __launch_bounds__(kMaxThreads) window_attention_forward_kernel(const FwdParams p) {
  constexpr int DPAD = G * kDimsPerThread;
  COS_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const TileRow r = tile_row(p.tiles, p.batch, p.heads, tid / G);
  const int g = tid % G;
  const TileInfo& t = r.t;
  const int b = r.b, h = r.h, lw = r.lw;
  const bool active = r.active;
  const int D = p.head_dim;

  // This row's query (rows past the tile's windows compute on zeros and store nothing).
  const int qi = window_query(t, t.win0 + lw, r.j);

  float qr[kDimsPerThread], acc[kDimsPerThread];
  {
    if (active) {
      load_slice<T, G>(qr, query_row<T>(p.q, p.q_stride, b, qi, h, true), p.q_stride[3], D, g, p.q_vec != 0, p.scale_log2);
    } else {
#pragma unroll
      for (int i = 0; i < kDimsPerThread; ++i) qr[i] = 0.f;
    }
  }
#pragma unroll
  for (int i = 0; i < kDimsPerThread; ++i) acc[i] = 0.f;
  float m = -INFINITY, l = 0.f;

  float* ks = smem;
  float* vs = smem + p.col_slots * DPAD;
  zero_padding<DPAD>(smem, 2 * p.col_slots, D, tid, nthreads);

  const T* kbase = kv_head<T>(p.k, p.k_stride, b, t.scale, h);
  const T* vbase = kv_head<T>(p.v, p.v_stride, b, t.scale, h);
  const int cb = t.cols_per_chunk;
  const float* krow0 = ks + lw * cb * DPAD;
  const float* vrow0 = vs + lw * cb * DPAD;

  for (int j0 = 0; j0 < t.cols_per_win; j0 += cb) {
    const int count = imin(cb, t.cols_per_win - j0);
    __syncthreads();  // the previous chunk has been consumed (and the padding zeroed)
    load_kv_chunk<T, DPAD>(ks, vs, kbase, vbase, p, t, j0, count, D, tid, nthreads);
    __syncthreads();

    for (int jg = 0; jg < count; jg += kKeyGroup) {
      float s[kKeyGroup];
#pragma unroll
      for (int jj = 0; jj < kKeyGroup; ++jj)
        s[jj] = jg + jj < count ? dot_slice<G>(qr, krow0 + (jg + jj) * DPAD, g) : 0.f;
      group_sum<G, kKeyGroup>(s);
      float mx = m;
#pragma unroll
      for (int jj = 0; jj < kKeyGroup; ++jj)
        if (jg + jj < count) mx = fmaxf(mx, s[jj]);
      const float alpha = exp2f(m - mx);  // m = -inf before the first key: alpha = 0
      l *= alpha;
#pragma unroll
      for (int i = 0; i < kDimsPerThread; ++i) acc[i] *= alpha;
#pragma unroll
      for (int jj = 0; jj < kKeyGroup; ++jj) {
        if (jg + jj < count) {
          const float pj = exp2f(s[jj] - mx);
          l += pj;
          axpy_slice<G>(acc, pj, vrow0 + (jg + jj) * DPAD, g);
        }
      }
      m = mx;
    }
  }

  if (active) {
    store_slice<T, G>(static_cast<T*>(p.out) + out_row(p, b, qi, h) * D, acc, D, g, p.out_vec != 0, 1.f / l);
    if (g == 0) p.lse[stat_index(p, r.bh, qi)] = (m + log2f(l)) * kLn2;
  }
}

}  // namespace detail
}  // namespace cos_kernels
