// Host-side API of the multi-scale windowed cross-attention kernels (no torch headers).
//
// The op (contract: the project's KERNELS.md and cos_kernels/ops/__init__.py):
//   q (B, Q, H, D), k and v (B, S, N, H, D) with any strides; query (scale s, window (r, c)) attends
//   over k[:, s, p], v[:, s, p] for the patches p of its window. Outputs out (B, Q, H, D) in q's dtype
//   and the logsumexp lse (B, H, Q) fp32 (natural log) of the scaled scores; the backward returns
//   dq (B, Q, H, D), dk and dv (B, S, N, H, D), all contiguous.
//
// A layout crosses as the flat spec (GH, GW, wh_0, ww_0, n_0, wh_1, ww_1, n_1, ...) of
// cos_kernels.WindowLayout.to_spec(). make_plan() turns it into tile tables:
//   q-tiles (forward and dQ): each thread block owns up to `rows` queries of one scale, from one
//     window or packed from several consecutive small windows, and streams the keys of those windows
//     through shared memory in chunks (online softmax in the forward);
//   k-tiles (dK and dV): each block owns up to `rows` keys (patches) of one scale, from one window or
//     several small ones, and streams the queries of those windows.
// Two kernel families share the tiling, chosen by dtype (make_plan):
//   fp32: CUDA cores. Inside a block, a group of G threads owns one row; each thread holds 16 of the
//     (padded) head dims; the streamed side goes through shared memory as fp32.
//   fp16 / bf16: tensor cores (mma.sync m16n8k16, fp32 accumulation). A block is one warp owning a
//     tile of 16 rows; the streamed side is staged in its own dtype by cp.async, double-buffered, and
//     read as mma fragments with ldmatrix.
// Tiles are ordered longest first (most columns per row), so long programs start first.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace cos_kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

inline size_t dtype_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

// ---- tuning constants (shared by host planner and kernels) -----------------------------------
constexpr int kDimsPerThread = 16;         // head dims held by one thread of a row group
constexpr int kMinHeadDim = 16;            // the op's contract: head dims 16..128
constexpr int kMaxHeadDim = 128;
constexpr int kMaxGroup = kMaxHeadDim / kDimsPerThread;  // 8 threads per row at D = 128
constexpr int kMaxThreads = 128;           // threads per block (at most)
constexpr int kSmemFloatsPerOperand = 2048;  // floats of one streamed operand chunk in shared memory
constexpr int kKeyGroup = 8;               // columns scored together (one online-softmax rescale)
constexpr int kBwdKeyGroup = 4;            // columns reduced together in the backward (register budget)
// tensor-core path (fp16 / bf16)
constexpr int kTcRows = 16;          // rows per tile: the m of mma.m16n8k16; one warp per block
constexpr int kTcChunkElems = 2048;  // column slots x padded head dim of one staged operand chunk
constexpr int kTcRowPad = 8;         // 16-bit elements appended to each staged row: ldmatrix's 8 rows hit 8 bank groups

// ---- tile table ------------------------------------------------------------------------------
// One tile = kTileInts int32: the fields below. "rows" are queries for q-tiles and keys (patches of
// the window, raster order inside the window) for k-tiles; "cols" are the other side.
enum TileField : int {
  kTileScale = 0,      // scale s
  kTileWin0,           // first window of the tile (raster index inside the scale)
  kTileNumWin,         // windows in the tile (consecutive)
  kTileRow0,           // first row inside each window
  kTileRowsPerWin,     // rows of each window in this tile (row i of the block: window i / this)
  kTileColsPerChunk,   // columns of each window per shared-memory chunk
  kTileColsPerWin,     // columns of each window in total (patches for q-tiles, queries for k-tiles)
  kTileWinH,           // window height (patch rows)
  kTileWinW,           // window width (patch columns)
  kTileWinCols,        // windows per row of the scale's window grid
  kTileQPerWin,        // queries per window
  kTileQOffset,        // index of the scale's first query
  kTileInts            // = 12
};

// ---- layout spec -----------------------------------------------------------------------------
struct LayoutSpec {
  int grid_h = 0, grid_w = 0;
  std::vector<int> win_h, win_w, queries;  // per scale

  int num_scales() const { return static_cast<int>(queries.size()); }
  int num_patches() const { return grid_h * grid_w; }
  int windows(int s) const { return (grid_h / win_h[s]) * (grid_w / win_w[s]); }
  int q_per_window(int s) const { return queries[s] / windows(s); }
  int patches_per_window(int s) const { return win_h[s] * win_w[s]; }
  int total_queries() const {
    int t = 0;
    for (int n : queries) t += n;
    return t;
  }
};

// Parses and validates a flat spec; returns "" on success, else a sentence naming what is wrong.
inline std::string parse_layout_spec(const int64_t* spec, size_t n, LayoutSpec* out) {
  auto show = [&]() {
    std::string s = "(";
    for (size_t i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(spec[i]);
    return s + ")";
  };
  if (n < 5 || (n - 2) % 3 != 0)
    return "layout_spec must be (GH, GW, wh_0, ww_0, n_0, ...) with 2 + 3 * num_scales ints, got " + show();
  for (size_t i = 0; i < n; ++i)
    if (spec[i] <= 0 || spec[i] > (int64_t{1} << 30))
      return "layout_spec entries must be positive ints below 2^30, got " + show();
  LayoutSpec L;
  L.grid_h = static_cast<int>(spec[0]);
  L.grid_w = static_cast<int>(spec[1]);
  if (int64_t{L.grid_h} * L.grid_w > (int64_t{1} << 30)) return "layout_spec grid is too large: " + show();
  int64_t total = 0;
  for (size_t i = 2; i < n; i += 3) {
    const int s = static_cast<int>((i - 2) / 3);
    const int wh = static_cast<int>(spec[i]), ww = static_cast<int>(spec[i + 1]);
    const int nq = static_cast<int>(spec[i + 2]);
    if (L.grid_h % wh || L.grid_w % ww)
      return "layout_spec scale " + std::to_string(s) + ": window (" + std::to_string(wh) + ", " +
             std::to_string(ww) + ") does not tile the grid (" + std::to_string(L.grid_h) + ", " +
             std::to_string(L.grid_w) + ")";
    const int nwin = (L.grid_h / wh) * (L.grid_w / ww);
    if (nq % nwin)
      return "layout_spec scale " + std::to_string(s) + ": " + std::to_string(nq) +
             " queries are not divisible by its " + std::to_string(nwin) + " windows";
    total += nq;
    L.win_h.push_back(wh);
    L.win_w.push_back(ww);
    L.queries.push_back(nq);
  }
  if (total > (int64_t{1} << 30)) return "layout_spec has too many queries: " + show();
  *out = std::move(L);
  return "";
}

// ---- launch configuration and plan -------------------------------------------------------------
struct LaunchConfig {
  int rows = 1;          // rows (queries or keys) per block
  int threads = 32;      // rows * group
  int col_slots = 0;     // column slots of one streamed chunk in shared memory
  int num_tiles = 0;
  size_t smem_bytes = 0;
};

struct Plan {
  bool tensor_cores = false;  // fp16 / bf16: the mma kernels (one warp, 16-row tiles); fp32: CUDA cores
  int head_dim = 0;
  int group = 1;           // threads per row: 1, 2, 4 or 8
  int padded_dim = 16;     // group * kDimsPerThread
  LaunchConfig q;          // forward and dQ
  LaunchConfig k;          // dK / dV
  std::vector<int32_t> tiles;  // q tiles (q.num_tiles * kTileInts) then k tiles
  size_t k_tile_offset() const { return static_cast<size_t>(q.num_tiles) * kTileInts; }
};

inline int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Threads per row for head dim D: each holds kDimsPerThread dims, a power of two in 1..kMaxGroup.
inline int group_for_head_dim(int head_dim) {
  return std::min(kMaxGroup, next_pow2((head_dim + kDimsPerThread - 1) / kDimsPerThread));
}

namespace detail {

// Tensor cores: a warp per block, 16-row tiles, kTcChunkElems / padded-dim column slots per chunk.
inline LaunchConfig make_tc_config(int group) {
  LaunchConfig c;
  c.rows = kTcRows;
  c.threads = 32;
  c.col_slots = kTcChunkElems / (group * kDimsPerThread);
  return c;
}

inline LaunchConfig make_config(int group, int max_rows_per_window) {
  LaunchConfig c;
  const int min_rows = std::max(1, 32 / group);  // at least one full warp
  const int max_rows = kMaxThreads / group;
  c.rows = std::min(max_rows, std::max(min_rows, next_pow2(max_rows_per_window)));
  c.threads = c.rows * group;
  c.col_slots = kSmemFloatsPerOperand / (group * kDimsPerThread);
  return c;
}

// Appends the tiles of every scale; key_rows selects k-tiles (rows = keys) over q-tiles.
inline void plan_tiles(const LayoutSpec& L, bool key_rows, LaunchConfig* cfg, std::vector<int32_t>* out) {
  struct Tile {
    int cost;
    int32_t f[kTileInts];
  };
  std::vector<Tile> tiles;
  int q_offset = 0;
  for (int s = 0; s < L.num_scales(); ++s) {
    const int nwin = L.windows(s), qpw = L.q_per_window(s), P = L.patches_per_window(s);
    const int rows_pw = key_rows ? P : qpw, cols_pw = key_rows ? qpw : P;
    auto add = [&](int win0, int nw, int row0, int rows, int cb) {
      Tile t;
      t.cost = cols_pw;
      t.f[kTileScale] = s;
      t.f[kTileWin0] = win0;
      t.f[kTileNumWin] = nw;
      t.f[kTileRow0] = row0;
      t.f[kTileRowsPerWin] = rows;
      t.f[kTileColsPerChunk] = cb;
      t.f[kTileColsPerWin] = cols_pw;
      t.f[kTileWinH] = L.win_h[s];
      t.f[kTileWinW] = L.win_w[s];
      t.f[kTileWinCols] = L.grid_w / L.win_w[s];
      t.f[kTileQPerWin] = qpw;
      t.f[kTileQOffset] = q_offset;
      tiles.push_back(t);
    };
    if (rows_pw >= cfg->rows) {
      // One window per tile; its rows in slices of cfg->rows.
      const int cb = std::min(cols_pw, cfg->col_slots);
      for (int w = 0; w < nwin; ++w)
        for (int r0 = 0; r0 < rows_pw; r0 += cfg->rows) add(w, 1, r0, std::min(cfg->rows, rows_pw - r0), cb);
    } else {
      // Several small windows per tile (an in-tile window id per row): as many as fit the rows,
      // without cutting a window's columns into chunks of fewer than min(cols, 8).
      const int by_rows = cfg->rows / rows_pw;
      const int by_cols = std::max(1, cfg->col_slots / std::min(cols_pw, kKeyGroup));
      const int nwt = std::max(1, std::min({by_rows, nwin, by_cols}));
      const int cb = std::min(cols_pw, cfg->col_slots / nwt);
      for (int w0 = 0; w0 < nwin; w0 += nwt) add(w0, std::min(nwt, nwin - w0), 0, rows_pw, cb);
    }
    q_offset += L.queries[s];
  }
  // Longest programs first (most columns streamed per row); stable, so raster order otherwise.
  std::stable_sort(tiles.begin(), tiles.end(), [](const Tile& a, const Tile& b) { return a.cost > b.cost; });
  for (const Tile& t : tiles) out->insert(out->end(), t.f, t.f + kTileInts);
  cfg->num_tiles = static_cast<int>(tiles.size());
}

}  // namespace detail

// The plan of a layout, head dim and dtype (fp32: CUDA cores; fp16 / bf16: tensor cores).
inline Plan make_plan(const LayoutSpec& L, int head_dim, DType dt) {
  Plan p;
  p.tensor_cores = dt != DType::kFloat32;
  p.head_dim = head_dim;
  p.group = group_for_head_dim(head_dim);
  p.padded_dim = p.group * kDimsPerThread;
  int max_qpw = 1, max_p = 1;
  for (int s = 0; s < L.num_scales(); ++s) {
    max_qpw = std::max(max_qpw, L.q_per_window(s));
    max_p = std::max(max_p, L.patches_per_window(s));
  }
  p.q = p.tensor_cores ? detail::make_tc_config(p.group) : detail::make_config(p.group, max_qpw);
  p.k = p.tensor_cores ? detail::make_tc_config(p.group) : detail::make_config(p.group, max_p);
  detail::plan_tiles(L, /*key_rows=*/false, &p.q, &p.tiles);
  detail::plan_tiles(L, /*key_rows=*/true, &p.k, &p.tiles);
  if (p.tensor_cores) {
    // two buffers x two operands (K, V or Q, dO) of col_slots rows of padded_dim + kTcRowPad 16-bit elements
    const size_t operands = 2 * 2 * static_cast<size_t>(p.q.col_slots) * (p.padded_dim + kTcRowPad) * 2;
    p.q.smem_bytes = operands;
    p.k.smem_bytes = operands + 2 * 2 * p.k.col_slots * sizeof(float);  // + lse, delta per buffer
  } else {
    const size_t operand = static_cast<size_t>(p.q.col_slots) * p.padded_dim * sizeof(float);
    p.q.smem_bytes = 2 * operand;                                      // K and V chunks
    p.k.smem_bytes = 2 * operand + 2 * p.k.col_slots * sizeof(float);  // Q, dO chunks + lse, delta
  }
  return p;
}

// ---- kernel parameters (passed by value) -------------------------------------------------------
struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;       // (B, Q, H, D) contiguous, q's dtype
  float* lse;      // (B, H, Q) contiguous
  int64_t q_stride[4];  // elements: b, q, h, d
  int64_t k_stride[5];  // b, s, n, h, d
  int64_t v_stride[5];
  const int32_t* tiles;  // device memory, q-tiles
  int num_tiles;
  int batch, heads, head_dim, total_queries, grid_w;
  int col_slots;
  float scale_log2;  // softmax_scale * log2(e)
  int q_vec, kv_vec, out_vec;  // 4-element vector accesses allowed
  int kv_async;                // 16-byte cp.async of K and V rows allowed (tensor-core path)
};

struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* grad_out;
  const float* lse;  // (B, H, Q) contiguous
  float* delta;      // (B, H, Q) scratch: rowsum(grad_out * out), written by the dQ kernel
  void* dq;          // (B, Q, H, D) contiguous
  void* dk;          // (B, S, N, H, D) contiguous
  void* dv;
  int64_t q_stride[4], o_stride[4], do_stride[4];
  int64_t k_stride[5], v_stride[5];
  const int32_t* q_tiles;
  const int32_t* k_tiles;
  int num_q_tiles, num_k_tiles;
  int batch, heads, head_dim, total_queries, num_scales, num_patches, grid_w;
  int q_col_slots, k_col_slots;
  float scale, scale_log2;
  int q_vec, kv_vec, o_vec, do_vec, dq_vec, dkv_vec;
  int kv_async, q_async, do_async;  // 16-byte cp.async of K, V / q / grad_out rows allowed (tensor cores)
};

// True when a tensor can be read n elements at a time along its last dim: unit last stride, every
// other stride and D multiples of n, base address aligned to n elements.
inline bool can_vec(const void* ptr, const int64_t* strides, int ndim, int head_dim, size_t elt, int n) {
  if (strides[ndim - 1] != 1 || head_dim % n) return false;
  for (int i = 0; i < ndim - 1; ++i)
    if (strides[i] % n) return false;
  return reinterpret_cast<uintptr_t>(ptr) % (n * elt) == 0;
}

// 4-element vector accesses (the CUDA-core path); 16-byte cp.async rows (the tensor-core path).
inline bool can_vec4(const void* ptr, const int64_t* strides, int ndim, int head_dim, size_t elt) {
  return can_vec(ptr, strides, ndim, head_dim, elt, 4);
}
inline bool can_copy16(const void* ptr, const int64_t* strides, int ndim, int head_dim, size_t elt) {
  return can_vec(ptr, strides, ndim, head_dim, elt, static_cast<int>(16 / elt));
}

// Launches (asynchronously on `stream`); return the launch error, if any.
// forward: one launch over all q-tiles x batch x heads.
cudaError_t launch_window_attention_forward(const FwdParams& p, DType dt, const Plan& plan, cudaStream_t stream);
// backward: the dQ kernel (also writes delta), then the dK/dV kernel; no atomics, deterministic.
cudaError_t launch_window_attention_backward(const BwdParams& p, DType dt, const Plan& plan, cudaStream_t stream);

// Blocks of one launch: tiles x batch x heads, must fit a 1-D grid.
inline bool grid_fits(int64_t tiles, int64_t batch, int64_t heads) {
  return tiles * batch * heads <= int64_t{0x7fffffff};
}

}  // namespace cos_kernels
