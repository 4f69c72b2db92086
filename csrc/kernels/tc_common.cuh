// Helpers of the tensor-core kernels (fp16 / bf16; tc_forward.cuh, tc_backward.cuh), no torch headers.
//
// A block is one warp and owns a tile of kTcRows = 16 rows (queries for q-tiles, keys for k-tiles) of
// one scale: a slice of one window's rows, or several consecutive small windows packed (the planner's
// tiles, window_attention.h). Lane l holds rows g = l / 4 and g + 8 of the mma fragments (mma.cuh);
// its own rows (the A operands) are loaded once from global memory into registers. The other side
// (columns: a window's patches for q-tiles, its queries for k-tiles) is staged into shared memory in
// chunks of up to col_slots rows, in its own dtype, by 16-byte cp.async where rows are contiguous and
// aligned (else element by element), in two buffers: chunk c + 1 is in flight while chunk c is used.
// A staged row is padded to DPAD + kTcRowPad elements, so ldmatrix's eight row addresses fall in
// eight different 16-byte bank groups (no conflicts). Column slot c of a chunk holds column
// j0 + c % cb of the tile's local window c / cb (cb = cols_per_chunk); a score is kept where the
// slot's window is the row's and c % cb < count, else masked (-inf before the softmax, 0 after).
#pragma once

#include "mma.cuh"

namespace cos_kernels {
namespace detail {

template <typename T>
COS_DEVICE uint32_t bits16(T x) {
  uint16_t r;
  std::memcpy(&r, static_cast<const void*>(&x), 2);
  return r;
}

// The element in the low / high half of a packed pair, as float.
template <typename T>
COS_DEVICE float unpack_lo(uint32_t pair) {
  const uint16_t bits = static_cast<uint16_t>(pair & 0xffffu);
  T x;
  std::memcpy(static_cast<void*>(&x), &bits, 2);
  return Elt<T>::to_float(x);
}

template <typename T>
COS_DEVICE float unpack_hi(uint32_t pair) {
  return unpack_lo<T>(pair >> 16);
}

// A fragments (rows g and g + 8, dims k * 16 .. k * 16 + 15 for k < G) of two global rows with dim
// stride sd; a null row, and dims >= D, load as zeros. Raw 16-bit values, no conversion.
template <typename T, int G>
COS_DEVICE void load_a_rows(uint32_t (&a)[G][4], const T* lo, const T* hi, int64_t sd, int D, int t) {
#pragma unroll
  for (int k = 0; k < G; ++k) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const T* row = (r & 1) ? hi : lo;
      const int d = k * 16 + 2 * t + (r >= 2 ? 8 : 0);
      const uint32_t x = row && d < D ? bits16(row[d * sd]) : 0u;
      const uint32_t y = row && d + 1 < D ? bits16(row[(d + 1) * sd]) : 0u;
      a[k][r] = x | y << 16;
    }
  }
}

// Zeroes N C fragments (fp32 accumulators).
template <int N>
COS_DEVICE void zero_frags(float (&acc)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;
}

// Block-cooperative (one warp) staging of a chunk: for local window w < num_win and jj < count, row
// w * cb + jj of dst (row stride RS elements) gets the D elements at src + row_offset(w, jj) (dim
// stride sd). async: 16-byte cp.async (D % 8 == 0, rows contiguous and aligned), in the caller's
// group; else plain element copies. Rows count..cb-1 of each window (a last, partial chunk) are
// zeroed: a masked column must still hold finite values, since P = 0 multiplies them.
template <typename T, int DPAD, int RS, typename RowOffset>
COS_DEVICE void stage_rows(T* dst, const T* src, int64_t sd, const RowOffset& row_offset, int num_win, int cb,
                           int count, int D, bool async, int lane) {
  if (async) {
    const int per_row = D / 8;
    const int total = num_win * count * per_row;
    for (int i = lane; i < total; i += 32) {
      const int row = i / per_row, d = (i - row * per_row) * 8;
      const int w = row / count, jj = row - w * count;
      cp_async16(dst + (w * cb + jj) * RS + d, src + row_offset(w, jj) + d);
    }
  } else {
    const int total = num_win * count * D;
    for (int i = lane; i < total; i += 32) {
      const int row = i / D, d = i - row * D;
      const int w = row / count, jj = row - w * count;
      dst[(w * cb + jj) * RS + d] = src[row_offset(w, jj) + d * sd];
    }
  }
  const int rest = cb - count, per_row = DPAD / 8;
  for (int i = lane; i < num_win * rest * per_row; i += 32) {
    const int row = i / per_row, w = row / rest;
    store_vec(dst + (w * cb + count + row - w * rest) * RS + (i - row * per_row) * 8, make_float4(0.f, 0.f, 0.f, 0.f));
  }
}

// Before the first chunk: zeroes what the fragments read but no staging writes, in each of the
// `regions` operand regions (C rows of RS elements, back to back): the padding dims D..DPAD-1 of rows
// below ncols16 (ncols rounded up to 16, the rows ldmatrix reads) and rows ncols..ncols16-1 whole.
// Then a barrier.
template <typename T, int DPAD, int RS>
COS_DEVICE void tc_zero_unstaged(T* smem, int regions, int C, int ncols, int D, int lane) {
  const int ncols16 = (ncols + 15) / 16 * 16;
  if (D < DPAD) {
    const int pad = DPAD - D;
    for (int i = lane; i < regions * ncols16 * pad; i += 32) {
      const int row = i / pad;  // over all regions
      smem[(row / ncols16) * C * RS + (row % ncols16) * RS + D + (i - row * pad)] = Elt<T>::from_float(0.f);
    }
  }
  const int extra = ncols16 - ncols, per_row = DPAD / 8;
  for (int i = lane; i < regions * extra * per_row; i += 32) {
    const int row = i / per_row;
    store_vec(smem + (row / extra) * C * RS + (ncols + row % extra) * RS + (i - row * per_row) * 8,
              make_float4(0.f, 0.f, 0.f, 0.f));
  }
  __syncthreads();
}

// B fragments of S = A * X^T for two 8-column tiles (staged rows col0 .. col0 + 15 of X) at dims
// d0 .. d0 + 15: {b[0], b[1]} for columns col0.., {b[2], b[3]} for col0 + 8.. (ldmatrix, no .trans).
template <int RS, typename T>
COS_DEVICE void ldsm_rows_as_bt(uint32_t (&b)[4], const T* rows, int col0, int d0, int lane) {
  const int m = lane / 8, r = lane % 8;
  ldmatrix_x4<false>(b, rows + (col0 + (m / 2) * 8 + r) * RS + d0 + (m % 2) * 8);
}

// B fragments of O = P * X for two 8-dim tiles (d0.., d0 + 8..) over staged rows col0 .. col0 + 15 of
// X as the k of the product: {b[0], b[1]} for dims d0.., {b[2], b[3]} for d0 + 8.. (ldmatrix .trans).
template <int RS, typename T>
COS_DEVICE void ldsm_rows_as_b(uint32_t (&b)[4], const T* rows, int col0, int d0, int lane) {
  const int m = lane / 8, r = lane % 8;
  ldmatrix_x4<true>(b, rows + (col0 + (m % 2) * 8 + r) * RS + d0 + (m / 2) * 8);
}

// acc (16 rows x 16 G dims, as 2 G C fragments) += P (A fragment over 16 staged rows from col0) * X.
template <typename T, int G, int RS>
COS_DEVICE void mma_rows(float (&acc)[2 * G][4], const uint32_t (&pa)[4], const T* rows, int col0, int lane) {
#pragma unroll
  for (int k = 0; k < G; ++k) {
    uint32_t b[4];
    ldsm_rows_as_b<RS>(b, rows, col0, k * 16, lane);
    mma_16816<T>(acc[2 * k], pa, {b[0], b[1]});
    mma_16816<T>(acc[2 * k + 1], pa, {b[2], b[3]});
  }
}

// s (16 rows x 16 columns, two C fragments) += A (16 rows x 16 G dims) * X^T over staged rows col0...
template <typename T, int G, int RS>
COS_DEVICE void mma_scores(float (&s)[2][4], const uint32_t (&a)[G][4], const T* rows, int col0, int lane) {
#pragma unroll
  for (int k = 0; k < G; ++k) {
    uint32_t b[4];
    ldsm_rows_as_bt<RS>(b, rows, col0, k * 16, lane);
    mma_16816<T>(s[0], a[k], {b[0], b[1]});
    mma_16816<T>(s[1], a[k], {b[2], b[3]});
  }
}

// Whether element i (0..3) of C fragment n (0, 1) of the 16-column step at col0 is a column of the
// row's window: slot c = col0 + 8 n + 2 t + i % 2, its window c / cb must be lw[i / 2] (the window of
// row g or g + 8) and c % cb < count.
COS_DEVICE bool tc_valid(int col0, int n, int i, int t, const int (&lw)[2], int cb, int count) {
  const int c = col0 + 8 * n + 2 * t + (i & 1);
  const int w = c / cb;
  return w == lw[i >> 1] && c - w * cb < count;
}

// Sum and max over the 4 lanes holding one fragment row (lanes 4 g .. 4 g + 3), fixed order.
COS_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

COS_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// Stores C fragments acc (16 rows x 16 G dims) * mul: row g to lo, row g + 8 to hi (contiguous rows of
// D elements, 4-byte aligned; a null row is skipped), dims >= D dropped. Even D: one 4-byte store per
// element pair.
template <typename T, int G>
COS_DEVICE void store_c_rows(T* lo, T* hi, const float (&acc)[2 * G][4], float mul, int D, int t) {
#pragma unroll
  for (int n = 0; n < 2 * G; ++n) {
    const int d = n * 8 + 2 * t;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      T* row = half ? hi : lo;
      if (!row || d >= D) continue;
      const float x = acc[n][2 * half] * mul, y = acc[n][2 * half + 1] * mul;
      if (D % 2 == 0) {
        store_vec(row + d, pack2<T>(x, y));
      } else {
        row[d] = Elt<T>::from_float(x);
        if (d + 1 < D) row[d + 1] = Elt<T>::from_float(y);
      }
    }
  }
}

// Stages patches j0 .. j0 + count - 1 of each of the tile's windows from K and V (read in place through
// their strides; kbase, vbase point at (b, scale, 0, h, 0)) into buffer u: K rows at smem + u * 2 C RS,
// V rows C RS after them. Params: FwdParams or BwdParams.
template <typename T, int DPAD, int RS, typename Params>
COS_DEVICE void stage_kv(T* smem, int C, const T* kbase, const T* vbase, const Params& p, const TileInfo& t, int j0,
                         int u, int lane) {
  const int count = imin(t.cols_per_chunk, t.cols_per_win - j0);
  T* ks = smem + u * 2 * C * RS;
  stage_rows<T, DPAD, RS>(
      ks, kbase, p.k_stride[4],
      [&](int w, int jj) { return window_patch(t, t.win0 + w, j0 + jj, p.grid_w) * p.k_stride[2]; }, t.num_win,
      t.cols_per_chunk, count, p.head_dim, p.kv_async != 0, lane);
  stage_rows<T, DPAD, RS>(
      ks + C * RS, vbase, p.v_stride[4],
      [&](int w, int jj) { return window_patch(t, t.win0 + w, j0 + jj, p.grid_w) * p.v_stride[2]; }, t.num_win,
      t.cols_per_chunk, count, p.head_dim, p.kv_async != 0, lane);
}

// The double-buffered walk over a tile's chunks of columns, the same in every kernel:
// stage(j0, u) issues the copies of the chunk starting at column j0 into buffer u (0 or 1);
// use(u, j0, count) runs once that chunk has landed, while the next one is in flight. One commit per
// chunk (possibly empty) keeps cp.async.wait_group 1 right for every chunk; barriers after each wait
// (every lane's copies visible) and after each use (the buffer is free for the chunk after next).
template <typename Stage, typename Use>
COS_DEVICE void for_each_chunk(const TileInfo& t, const Stage& stage, const Use& use) {
  const int cb = t.cols_per_chunk;
  stage(0, 0);
  cp_async_commit();
  for (int j0 = 0, u = 0; j0 < t.cols_per_win; j0 += cb, u ^= 1) {
    if (j0 + cb < t.cols_per_win) stage(j0 + cb, u ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    use(u, j0, imin(cb, t.cols_per_win - j0));
    __syncthreads();
  }
  cp_async_wait<0>();  // the last (empty) group
}

// The walk of the forward and dQ kernels over their tile's keys and values (B, S, N, H, D): zeroes
// what staging leaves unwritten (tc_zero_unstaged, K and V of both buffers), then stages K and V
// chunk by chunk (stage_kv, for_each_chunk) and runs use(ks, vs, count) on each chunk once it has
// landed (ks, vs: its C staged rows of K, of V; count columns per window). Params: FwdParams or
// BwdParams.
template <typename T, int DPAD, int RS, typename Params, typename Use>
COS_DEVICE void for_each_kv_chunk(T* smem, int C, int ncols, const Params& p, const BlockTile& tile, int lane,
                                  const Use& use) {
  const TileInfo& ti = tile.t;
  tc_zero_unstaged<T, DPAD, RS>(smem, 4, C, ncols, p.head_dim, lane);
  const T* kbase = kv_head<T>(p.k, p.k_stride, tile.b, ti.scale, tile.h);
  const T* vbase = kv_head<T>(p.v, p.v_stride, tile.b, ti.scale, tile.h);
  for_each_chunk(
      ti, [&](int j0, int u) { stage_kv<T, DPAD, RS>(smem, C, kbase, vbase, p, ti, j0, u, lane); },
      [&](int u, int, int count) {
        const T* ks = smem + u * 2 * C * RS;
        use(ks, ks + C * RS, count);
      });
}

}  // namespace detail
}  // namespace cos_kernels
