// Device helpers shared by the forward and backward kernels (no torch headers).
//
// The kernels are plain CUDA C++; they also compile as host C++ under the CPU emulation of
// ../tests/emulation.h (which defines threadIdx, __syncthreads, __shfl_xor_sync and the dynamic
// shared memory before including this file), so their logic can be tested where no GPU exists.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "window_attention.h"

#if defined(__CUDACC__)
#define COS_DEVICE __device__ __forceinline__
#define COS_DYNAMIC_SMEM(name)                 \
  extern __shared__ float4 cos_dynamic_smem_[]; \
  float* name = reinterpret_cast<float*>(cos_dynamic_smem_)
#else
#define COS_DEVICE inline
#define COS_DYNAMIC_SMEM(name) float* name = ::cos_emu::dynamic_smem()
#endif

// Host builds (the CPU emulation) may check the alignment a GPU vector access needs.
#ifndef COS_CHECK_ALIGNED
#define COS_CHECK_ALIGNED(ptr, bytes) ((void)0)
#endif

namespace cos_kernels {
namespace detail {

// ---- aligned vector accesses -------------------------------------------------------------------
// One access of a whole vector V (float4: 16 bytes, uint2: 8 bytes) at p, aligned to sizeof(V): a
// single instruction on the GPU; in host builds (the CPU emulation) an alignment check and a memcpy.
template <typename V>
COS_DEVICE V load_vec(const void* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const V*>(p);
#else
  COS_CHECK_ALIGNED(p, sizeof(V));
  V r;
  std::memcpy(static_cast<void*>(&r), p, sizeof(r));
  return r;
#endif
}

template <typename V>
COS_DEVICE void store_vec(void* p, V v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<V*>(p) = v;
#else
  COS_CHECK_ALIGNED(p, sizeof(V));
  std::memcpy(p, static_cast<const void*>(&v), sizeof(v));
#endif
}

// ---- element types: conversions and 4-element vector accesses ---------------------------------
template <typename T>
struct Elt;

template <>
struct Elt<float> {
  static COS_DEVICE float to_float(float x) { return x; }
  static COS_DEVICE float from_float(float x) { return x; }
  static COS_DEVICE float4 load4(const float* p) { return load_vec<float4>(p); }
  static COS_DEVICE void store4(float* p, float4 v) { store_vec(p, v); }
};

// 16-bit types: 4 elements = 8 bytes = two packed pairs.
template <typename T, typename T2>
struct Elt16 {
  static COS_DEVICE uint2 load_raw(const T* p) { return load_vec<uint2>(p); }
  static COS_DEVICE void store_raw(T* p, uint2 v) { store_vec(p, v); }
  static COS_DEVICE T2 as_pair(unsigned int bits) {
    T2 r;
    std::memcpy(static_cast<void*>(&r), static_cast<const void*>(&bits), sizeof(r));
    return r;
  }
  static COS_DEVICE unsigned int as_bits(T2 pair) {
    unsigned int r;
    std::memcpy(static_cast<void*>(&r), static_cast<const void*>(&pair), sizeof(r));
    return r;
  }
};

template <>
struct Elt<__half> : Elt16<__half, __half2> {
  static COS_DEVICE float to_float(__half x) { return __half2float(x); }
  static COS_DEVICE __half from_float(float x) { return __float2half_rn(x); }
  static COS_DEVICE float4 load4(const __half* p) {
    const uint2 raw = load_raw(p);
    const float2 a = __half22float2(as_pair(raw.x)), b = __half22float2(as_pair(raw.y));
    return make_float4(a.x, a.y, b.x, b.y);
  }
  static COS_DEVICE void store4(__half* p, float4 v) {
    uint2 raw;
    raw.x = as_bits(__floats2half2_rn(v.x, v.y));
    raw.y = as_bits(__floats2half2_rn(v.z, v.w));
    store_raw(p, raw);
  }
};

template <>
struct Elt<__nv_bfloat16> : Elt16<__nv_bfloat16, __nv_bfloat162> {
  static COS_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static COS_DEVICE __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static COS_DEVICE float4 load4(const __nv_bfloat16* p) {
    const uint2 raw = load_raw(p);
    const float2 a = __bfloat1622float2(as_pair(raw.x)), b = __bfloat1622float2(as_pair(raw.y));
    return make_float4(a.x, a.y, b.x, b.y);
  }
  static COS_DEVICE void store4(__nv_bfloat16* p, float4 v) {
    uint2 raw;
    raw.x = as_bits(__floats2bfloat162_rn(v.x, v.y));
    raw.y = as_bits(__floats2bfloat162_rn(v.z, v.w));
    store_raw(p, raw);
  }
};

// ---- shared-memory float4 access ---------------------------------------------------------------
COS_DEVICE float4 lds4(const float* p) { return load_vec<float4>(p); }
COS_DEVICE void sts4(float* p, float4 v) { store_vec(p, v); }

// ---- a thread's slice of a row -----------------------------------------------------------------
// A row of the head dim is split over a group of G threads; thread g of the group holds the dims
// d = c * 4G + 4g + e for c < kDimsPerThread / 4, e < 4 (so the group reads consecutive 16-byte
// pieces of a shared-memory row: no bank conflicts). Dims >= D are held as zeros.
constexpr int kChunks = kDimsPerThread / 4;

template <int G>
COS_DEVICE int slice_dim(int c, int g) {
  return c * 4 * G + 4 * g;
}

// r[:] = row[dims of thread g] * mul; `row` points at element d = 0, `sd` is the dim stride.
template <typename T, int G>
COS_DEVICE void load_slice(float (&r)[kDimsPerThread], const T* row, int64_t sd, int head_dim, int g, bool vec,
                           float mul) {
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int d0 = slice_dim<G>(c, g);
    if (vec && d0 < head_dim) {  // vec implies head_dim % 4 == 0 and sd == 1
      const float4 f = Elt<T>::load4(row + d0);
      r[4 * c + 0] = f.x * mul;
      r[4 * c + 1] = f.y * mul;
      r[4 * c + 2] = f.z * mul;
      r[4 * c + 3] = f.w * mul;
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int d = d0 + e;
        r[4 * c + e] = d < head_dim ? Elt<T>::to_float(row[d * sd]) * mul : 0.f;
      }
    }
  }
}

// row[dims of thread g] = r[:] * mul, into a contiguous row (dim stride 1).
template <typename T, int G>
COS_DEVICE void store_slice(T* row, const float (&r)[kDimsPerThread], int head_dim, int g, bool vec, float mul) {
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int d0 = slice_dim<G>(c, g);
    if (vec && d0 < head_dim) {
      Elt<T>::store4(row + d0, make_float4(r[4 * c] * mul, r[4 * c + 1] * mul, r[4 * c + 2] * mul,
                                           r[4 * c + 3] * mul));
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (d0 + e < head_dim) row[d0 + e] = Elt<T>::from_float(r[4 * c + e] * mul);
    }
  }
}

// Partial dot product of a thread's slice with the same dims of a shared-memory row.
template <int G>
COS_DEVICE float dot_slice(const float (&r)[kDimsPerThread], const float* srow, int g) {
  float a = 0.f;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const float4 x = lds4(srow + slice_dim<G>(c, g));
    a = fmaf(r[4 * c + 0], x.x, a);
    a = fmaf(r[4 * c + 1], x.y, a);
    a = fmaf(r[4 * c + 2], x.z, a);
    a = fmaf(r[4 * c + 3], x.w, a);
  }
  return a;
}

// acc[:] += w * (slice of a shared-memory row).
template <int G>
COS_DEVICE void axpy_slice(float (&acc)[kDimsPerThread], float w, const float* srow, int g) {
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const float4 x = lds4(srow + slice_dim<G>(c, g));
    acc[4 * c + 0] = fmaf(w, x.x, acc[4 * c + 0]);
    acc[4 * c + 1] = fmaf(w, x.y, acc[4 * c + 1]);
    acc[4 * c + 2] = fmaf(w, x.z, acc[4 * c + 2]);
    acc[4 * c + 3] = fmaf(w, x.w, acc[4 * c + 3]);
  }
}

// Sum over the G threads of a row group (consecutive lanes, G a power of two <= 32), in a fixed
// butterfly order: every lane gets the same, deterministic total. All lanes of the warp call it.
template <int G, int N>
COS_DEVICE void group_sum(float (&x)[N]) {
#pragma unroll
  for (int off = G / 2; off > 0; off /= 2) {
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] += __shfl_xor_sync(0xffffffffu, x[i], off);
  }
}

template <int G>
COS_DEVICE float group_sum1(float x) {
  float a[1] = {x};
  group_sum<G, 1>(a);
  return a[0];
}

// ---- tiles and window geometry -----------------------------------------------------------------
struct TileInfo {
  int scale, win0, num_win, row0, rows_per_win, cols_per_chunk, cols_per_win;
  int win_h, win_w, win_cols, q_per_win, q_offset;
};

COS_DEVICE TileInfo load_tile(const int32_t* tiles, int idx) {
  const int32_t* f = tiles + static_cast<int64_t>(idx) * kTileInts;
  TileInfo t;
  t.scale = f[kTileScale];
  t.win0 = f[kTileWin0];
  t.num_win = f[kTileNumWin];
  t.row0 = f[kTileRow0];
  t.rows_per_win = f[kTileRowsPerWin];
  t.cols_per_chunk = f[kTileColsPerChunk];
  t.cols_per_win = f[kTileColsPerWin];
  t.win_h = f[kTileWinH];
  t.win_w = f[kTileWinW];
  t.win_cols = f[kTileWinCols];
  t.q_per_win = f[kTileQPerWin];
  t.q_offset = f[kTileQOffset];
  return t;
}

// Raster patch index of the j-th patch (raster order inside the window) of window w of the tile's scale.
COS_DEVICE int window_patch(const TileInfo& t, int w, int j, int grid_w) {
  const int wr = w / t.win_cols, wc = w - wr * t.win_cols;
  const int y = j / t.win_w, x = j - y * t.win_w;
  return (wr * t.win_h + y) * grid_w + wc * t.win_w + x;
}

// Global query index of the j-th query of window w of the tile's scale.
COS_DEVICE int window_query(const TileInfo& t, int w, int j) { return t.q_offset + w * t.q_per_win + j; }

// The tile of this block and its (batch image, head): launches are tile-major over (tile, batch
// image, head): block blockIdx.x runs tile blockIdx.x / (B * H) for bh = b * H + h.
struct BlockTile {
  TileInfo t;
  int b, h, bh;
};

COS_DEVICE BlockTile block_tile(const int32_t* tiles, int batch, int heads) {
  BlockTile r;
  const int BH = batch * heads;
  const int tile_idx = static_cast<int>(blockIdx.x / BH);
  r.bh = static_cast<int>(blockIdx.x - static_cast<unsigned>(tile_idx) * BH);
  r.b = r.bh / heads;
  r.h = r.bh - r.b * heads;
  r.t = load_tile(tiles, tile_idx);
  return r;
}

// Row `row` of a tile belongs to the tile's local window row / rows_per_win, at index row0 + row %
// rows_per_win inside it (a query of the window for q-tiles, a patch for k-tiles). Rows past the
// tile's windows are inactive: they compute as window 0 (on zeros) and store nothing.
struct RowPlace {
  bool active;
  int lw;  // local window of the row (0 where inactive)
  int j;   // index of the row inside its window
};

COS_DEVICE RowPlace row_place(const TileInfo& t, int row) {
  RowPlace r;
  const int lw_raw = row / t.rows_per_win;
  r.active = lw_raw < t.num_win;
  r.lw = r.active ? lw_raw : 0;
  r.j = t.row0 + row % t.rows_per_win;
  return r;
}

// Where row `row` (G threads) of this block stands: its tile, (b, h) and place in the tile.
struct TileRow {
  TileInfo t;
  int bh, b, h;
  bool active;
  int lw;  // local window of the row (0 where inactive)
  int j;   // index of the row inside its window
};

COS_DEVICE TileRow tile_row(const int32_t* tiles, int batch, int heads, int row) {
  const BlockTile bt = block_tile(tiles, batch, heads);
  const RowPlace rp = row_place(bt.t, row);
  return TileRow{bt.t, bt.bh, bt.b, bt.h, rp.active, rp.lw, rp.j};
}

// Row pointer of query qi of batch image b, head h in a (B, Q, H, D) tensor (q, out, grad_out);
// null where inactive.
template <typename T>
COS_DEVICE const T* query_row(const void* base, const int64_t (&stride)[4], int b, int qi, int h, bool active) {
  return active ? static_cast<const T*>(base) + b * stride[0] + qi * stride[1] + h * stride[2] : nullptr;
}

// Pointer at (b, scale, patch 0, h, dim 0) of a (B, S, N, H, D) tensor (k, v); patch n's row is
// n * stride[2] elements further.
template <typename T>
COS_DEVICE const T* kv_head(const void* base, const int64_t (&stride)[5], int b, int scale, int h) {
  return static_cast<const T*>(base) + b * stride[0] + scale * stride[1] + h * stride[3];
}

// Row index (int64) of query qi, head h of image b in the contiguous (B, Q, H, D) outputs out and dq.
// Params: FwdParams or BwdParams.
template <typename Params>
COS_DEVICE int64_t out_row(const Params& p, int b, int qi, int h) {
  return (static_cast<int64_t>(b) * p.total_queries + qi) * p.heads + h;
}

// Index (int64) of query qi of (image, head) bh = b * H + h in the (B * H, Q) fp32 lse and delta.
template <typename Params>
COS_DEVICE int64_t stat_index(const Params& p, int bh, int qi) {
  return static_cast<int64_t>(bh) * p.total_queries + qi;
}

// Block-cooperative copy of a chunk of rows into shared memory as floats:
// for lw < num_win, jj < count: dst[(lw * slot_stride + jj) * DPAD + d] = src[row_offset(lw, jj) + d * sd]
// for d < head_dim (dims head_dim..DPAD-1 are left as they are: zeroed once by the caller).
template <typename T, int DPAD, typename RowOffset>
COS_DEVICE void load_rows(float* dst, const T* src, int64_t sd, const RowOffset& row_offset, int num_win,
                          int slot_stride, int count, int head_dim, bool vec, int tid, int nthreads) {
  if (vec) {
    const int per_row = head_dim / 4;
    const int total = num_win * count * per_row;
    for (int i = tid; i < total; i += nthreads) {
      const int row = i / per_row, d = (i - row * per_row) * 4;
      const int lw = row / count, jj = row - lw * count;
      sts4(dst + (lw * slot_stride + jj) * DPAD + d, Elt<T>::load4(src + row_offset(lw, jj) + d));
    }
  } else {
    const int total = num_win * count * head_dim;
    for (int i = tid; i < total; i += nthreads) {
      const int row = i / head_dim, d = i - row * head_dim;
      const int lw = row / count, jj = row - lw * count;
      dst[(lw * slot_stride + jj) * DPAD + d] = Elt<T>::to_float(src[row_offset(lw, jj) + d * sd]);
    }
  }
}

// Copies patches j0 .. j0 + count - 1 of each of the tile's windows from K and V (read in place through
// their strides; kbase, vbase point at (b, scale, 0, h, 0)) into the shared-memory rows ks and vs:
// patch j0 + jj of local window w goes to row w * cols_per_chunk + jj. Params: FwdParams or BwdParams.
template <typename T, int DPAD, typename Params>
COS_DEVICE void load_kv_chunk(float* ks, float* vs, const T* kbase, const T* vbase, const Params& p,
                              const TileInfo& t, int j0, int count, int head_dim, int tid, int nthreads) {
  load_rows<T, DPAD>(
      ks, kbase, p.k_stride[4],
      [&](int w, int jj) { return window_patch(t, t.win0 + w, j0 + jj, p.grid_w) * p.k_stride[2]; }, t.num_win,
      t.cols_per_chunk, count, head_dim, p.kv_vec != 0, tid, nthreads);
  load_rows<T, DPAD>(
      vs, vbase, p.v_stride[4],
      [&](int w, int jj) { return window_patch(t, t.win0 + w, j0 + jj, p.grid_w) * p.v_stride[2]; }, t.num_win,
      t.cols_per_chunk, count, head_dim, p.kv_vec != 0, tid, nthreads);
}

// Zeroes the padding dims head_dim..DPAD-1 of `rows` shared-memory rows.
template <int DPAD>
COS_DEVICE void zero_padding(float* dst, int rows, int head_dim, int tid, int nthreads) {
  const int pad = DPAD - head_dim;
  if (pad <= 0) return;
  for (int i = tid; i < rows * pad; i += nthreads) {
    const int r = i / pad;
    dst[r * DPAD + head_dim + (i - r * pad)] = 0.f;
  }
}

COS_DEVICE int imin(int a, int b) { return a < b ? a : b; }

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

}  // namespace detail
}  // namespace cos_kernels
