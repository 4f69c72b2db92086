// Test harness shared by the GPU test (test_window_attention.cu, ctest) and the CPU emulation test
// (test_emulated.cpp): random layouts and strided inputs, a float64 reference written as a plain loop
// over windows (forward and analytic gradients), plan coverage checks and the comparison.
// Host code only; the "runner" supplies memory and the kernel launches (GPU or emulated).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../kernels/window_attention.h"

namespace cos_test {

using cos_kernels::DType;
using cos_kernels::LayoutSpec;
using cos_kernels::Plan;

// ---- element storage ---------------------------------------------------------------------------
inline float round_to(DType dt, float x) {
  switch (dt) {
    case DType::kFloat16: return __half2float(__float2half_rn(x));
    case DType::kBFloat16: return __bfloat162float(__float2bfloat16_rn(x));
    default: return x;
  }
}

inline void store_elt(DType dt, uint8_t* base, int64_t idx, float x) {
  if (dt == DType::kFloat32) {
    std::memcpy(base + idx * 4, &x, 4);
  } else if (dt == DType::kFloat16) {
    const __half h = __float2half_rn(x);
    std::memcpy(base + idx * 2, &h, 2);
  } else {
    const __nv_bfloat16 h = __float2bfloat16_rn(x);
    std::memcpy(base + idx * 2, &h, 2);
  }
}

inline float load_elt(DType dt, const uint8_t* base, int64_t idx) {
  if (dt == DType::kFloat32) {
    float x;
    std::memcpy(&x, base + idx * 4, 4);
    return x;
  }
  if (dt == DType::kFloat16) {
    __half h;
    std::memcpy(&h, base + idx * 2, 2);
    return __half2float(h);
  }
  __nv_bfloat16 h;
  std::memcpy(&h, base + idx * 2, 2);
  return __bfloat162float(h);
}

// ---- cases ---------------------------------------------------------------------------------------
struct Case {
  std::string name;
  std::vector<int64_t> spec;
  LayoutSpec L;
  int B = 1, H = 1, D = 64;
  DType dt = DType::kFloat32;
  int q_mode = 0;   // 0 contiguous, 1 batch stride 0 (one q for every batch), 2 head-major (B, H, Q, D)
  int kv_mode = 0;  // 0 contiguous, 1 views of one fused (B, N, S, 2, H, D), 2 dim-strided (B, S, N, D, H)
  float scale = 0.125f;

  std::string describe() const {
    std::string s = name + " spec=(";
    for (size_t i = 0; i < spec.size(); ++i) s += (i ? "," : "") + std::to_string(spec[i]);
    return s + ") B=" + std::to_string(B) + " H=" + std::to_string(H) + " D=" + std::to_string(D) + " " +
           cos_kernels::dtype_name(dt) + " q_mode=" + std::to_string(q_mode) +
           " kv_mode=" + std::to_string(kv_mode);
  }
};

inline Case make_case(const std::string& name, std::vector<int64_t> spec, int B, int H, int D, DType dt, int q_mode,
                      int kv_mode, std::mt19937_64& rng) {
  Case c;
  c.name = name;
  c.spec = std::move(spec);
  const std::string err = cos_kernels::parse_layout_spec(c.spec.data(), c.spec.size(), &c.L);
  if (!err.empty()) {
    std::fprintf(stderr, "bad test layout: %s\n", err.c_str());
    std::abort();
  }
  c.B = B;
  c.H = H;
  c.D = D;
  c.dt = dt;
  c.q_mode = q_mode;
  c.kv_mode = kv_mode;
  std::uniform_real_distribution<float> u(0.5f, 1.5f);
  c.scale = u(rng) / std::sqrt(static_cast<float>(D));
  return c;
}

// A random layout like tests/oracle.random_layout: rectangular grid 2..max_grid, 1..max_scales scales,
// rectangular windows (divisors of the grid sides), 1..max_qpw queries per window.
inline std::vector<int64_t> random_spec(std::mt19937_64& rng, int max_scales = 3, int max_qpw = 16, int max_grid = 12) {
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  auto divisor = [&](int n) {
    std::vector<int> d;
    for (int i = 1; i <= n; ++i)
      if (n % i == 0) d.push_back(i);
    return d[pick(0, static_cast<int>(d.size()) - 1)];
  };
  const int gh = pick(2, max_grid), gw = pick(2, max_grid);
  std::vector<int64_t> spec = {gh, gw};
  const int scales = pick(1, max_scales);
  for (int s = 0; s < scales; ++s) {
    const int wh = divisor(gh), ww = divisor(gw);
    spec.insert(spec.end(), {wh, ww, int64_t{gh / wh} * (gw / ww) * pick(1, max_qpw)});
  }
  return spec;
}

// ---- host data -------------------------------------------------------------------------------------
struct HostData {
  int Q = 0, S = 0, N = 0;
  // logical values (already rounded to the dtype), row-major (B,Q,H,D) / (B,S,N,H,D)
  std::vector<double> q, k, v, dout;
  // storage as the kernels read it
  std::vector<uint8_t> q_store, kv_store, do_store;
  int64_t q_stride[4], k_stride[5], v_stride[5], do_stride[4];
  int64_t k_offset = 0, v_offset = 0;  // elements into kv_store
};

inline HostData make_data(const Case& c, std::mt19937_64& rng) {
  HostData d;
  const int B = c.B, H = c.H, D = c.D;
  d.Q = c.L.total_queries();
  d.S = c.L.num_scales();
  d.N = c.L.num_patches();
  const int Q = d.Q, S = d.S, N = d.N;
  const size_t es = cos_kernels::dtype_size(c.dt);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto draw = [&]() { return round_to(c.dt, normal(rng)); };

  // q
  const int64_t qsz = int64_t{Q} * H * D;
  if (c.q_mode == 1) {
    d.q_store.resize(qsz * es);
    const int64_t st[4] = {0, int64_t{H} * D, D, 1};
    std::copy(st, st + 4, d.q_stride);
  } else if (c.q_mode == 2) {
    d.q_store.resize(B * qsz * es);
    const int64_t st[4] = {qsz, D, int64_t{Q} * D, 1};
    std::copy(st, st + 4, d.q_stride);
  } else {
    d.q_store.resize(B * qsz * es);
    const int64_t st[4] = {qsz, int64_t{H} * D, D, 1};
    std::copy(st, st + 4, d.q_stride);
  }
  d.q.resize(B * qsz);
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < Q; ++i)
      for (int h = 0; h < H; ++h)
        for (int e = 0; e < D; ++e) {
          const int64_t at = b * d.q_stride[0] + i * d.q_stride[1] + h * d.q_stride[2] + e * d.q_stride[3];
          const int64_t logical = ((int64_t{b} * Q + i) * H + h) * D + e;
          if (c.q_mode == 1 && b > 0) {
            d.q[logical] = d.q[((int64_t{i}) * H + h) * D + e];  // same storage as batch 0
          } else {
            const float x = draw();
            d.q[logical] = x;
            store_elt(c.dt, d.q_store.data(), at, x);
          }
        }

  // k, v
  const int64_t kvsz = int64_t{B} * S * N * H * D;
  if (c.kv_mode == 1) {
    d.kv_store.resize(2 * kvsz * es);
    const int64_t st[5] = {int64_t{N} * S * 2 * H * D, 2 * int64_t{H} * D, int64_t{S} * 2 * H * D, D, 1};
    std::copy(st, st + 5, d.k_stride);
    std::copy(st, st + 5, d.v_stride);
    d.k_offset = 0;
    d.v_offset = int64_t{H} * D;
  } else if (c.kv_mode == 2) {
    d.kv_store.resize(2 * kvsz * es);
    const int64_t st[5] = {int64_t{S} * N * D * H, int64_t{N} * D * H, int64_t{D} * H, 1, H};
    std::copy(st, st + 5, d.k_stride);
    std::copy(st, st + 5, d.v_stride);
    d.k_offset = 0;
    d.v_offset = kvsz;
  } else {
    d.kv_store.resize(2 * kvsz * es);
    const int64_t st[5] = {int64_t{S} * N * H * D, int64_t{N} * H * D, int64_t{H} * D, D, 1};
    std::copy(st, st + 5, d.k_stride);
    std::copy(st, st + 5, d.v_stride);
    d.k_offset = 0;
    d.v_offset = kvsz;
  }
  d.k.resize(kvsz);
  d.v.resize(kvsz);
  for (int b = 0; b < B; ++b)
    for (int s = 0; s < S; ++s)
      for (int n = 0; n < N; ++n)
        for (int h = 0; h < H; ++h)
          for (int e = 0; e < D; ++e) {
            const int64_t logical = (((int64_t{b} * S + s) * N + n) * H + h) * D + e;
            const float kx = draw(), vx = draw();
            d.k[logical] = kx;
            d.v[logical] = vx;
            store_elt(c.dt, d.kv_store.data(),
                      d.k_offset + b * d.k_stride[0] + s * d.k_stride[1] + n * d.k_stride[2] + h * d.k_stride[3] +
                          e * d.k_stride[4],
                      kx);
            store_elt(c.dt, d.kv_store.data(),
                      d.v_offset + b * d.v_stride[0] + s * d.v_stride[1] + n * d.v_stride[2] + h * d.v_stride[3] +
                          e * d.v_stride[4],
                      vx);
          }

  // grad_out, contiguous
  d.dout.resize(B * qsz);
  d.do_store.resize(B * qsz * es);
  const int64_t st[4] = {qsz, int64_t{H} * D, D, 1};
  std::copy(st, st + 4, d.do_stride);
  for (int64_t i = 0; i < B * qsz; ++i) {
    const float x = draw();
    d.dout[i] = x;
    store_elt(c.dt, d.do_store.data(), i, x);
  }
  return d;
}

// ---- float64 reference: an explicit loop over scales, windows and the window's patches ----------
struct Reference {
  std::vector<double> out, lse, dq, dk, dv;
};

inline Reference reference(const Case& c, const HostData& d) {
  const int B = c.B, H = c.H, D = c.D, Q = d.Q, S = d.S, N = d.N;
  const LayoutSpec& L = c.L;
  Reference r;
  r.out.assign(int64_t{B} * Q * H * D, 0.0);
  r.lse.assign(int64_t{B} * H * Q, 0.0);
  r.dq.assign(r.out.size(), 0.0);
  r.dk.assign(int64_t{B} * S * N * H * D, 0.0);
  r.dv.assign(r.dk.size(), 0.0);
  auto qa = [&](int b, int i, int h) { return ((int64_t{b} * Q + i) * H + h) * D; };
  auto ka = [&](int b, int s, int n, int h) { return (((int64_t{b} * S + s) * N + n) * H + h) * D; };
  int first_query = 0;
  for (int s = 0; s < S; ++s) {
    const int wh = L.win_h[s], ww = L.win_w[s];
    const int rows = L.grid_h / wh, cols = L.grid_w / ww;
    const int qpw = L.queries[s] / (rows * cols);
    for (int wr = 0; wr < rows; ++wr)
      for (int wc = 0; wc < cols; ++wc) {
        std::vector<int> patches;
        for (int y = wr * wh; y < (wr + 1) * wh; ++y)
          for (int x = wc * ww; x < (wc + 1) * ww; ++x) patches.push_back(y * L.grid_w + x);
        const int P = static_cast<int>(patches.size());
        for (int qq = 0; qq < qpw; ++qq) {
          const int i = first_query + (wr * cols + wc) * qpw + qq;
          for (int b = 0; b < B; ++b)
            for (int h = 0; h < H; ++h) {
              std::vector<double> sc(P), pr(P), dp(P);
              double mx = -INFINITY;
              for (int j = 0; j < P; ++j) {
                double a = 0;
                for (int e = 0; e < D; ++e) a += d.q[qa(b, i, h) + e] * d.k[ka(b, s, patches[j], h) + e];
                sc[j] = a * c.scale;
                mx = std::max(mx, sc[j]);
              }
              double l = 0;
              for (int j = 0; j < P; ++j) l += (pr[j] = std::exp(sc[j] - mx));
              for (int j = 0; j < P; ++j) pr[j] /= l;
              r.lse[(int64_t{b} * H + h) * Q + i] = mx + std::log(l);
              for (int e = 0; e < D; ++e) {
                double o = 0;
                for (int j = 0; j < P; ++j) o += pr[j] * d.v[ka(b, s, patches[j], h) + e];
                r.out[qa(b, i, h) + e] = o;
              }
              // gradients
              double delta = 0;
              for (int j = 0; j < P; ++j) {
                double a = 0;
                for (int e = 0; e < D; ++e) a += d.dout[qa(b, i, h) + e] * d.v[ka(b, s, patches[j], h) + e];
                dp[j] = a;
                delta += pr[j] * a;
              }
              for (int j = 0; j < P; ++j) {
                const double ds = pr[j] * (dp[j] - delta) * c.scale;
                for (int e = 0; e < D; ++e) {
                  r.dq[qa(b, i, h) + e] += ds * d.k[ka(b, s, patches[j], h) + e];
                  r.dk[ka(b, s, patches[j], h) + e] += ds * d.q[qa(b, i, h) + e];
                  r.dv[ka(b, s, patches[j], h) + e] += pr[j] * d.dout[qa(b, i, h) + e];
                }
              }
            }
        }
      }
    first_query += L.queries[s];
  }
  return r;
}

// ---- plan checks ---------------------------------------------------------------------------------
// Every query is a row of exactly one q-tile and every (scale, patch) of exactly one k-tile, and
// every chunk fits the shared-memory slots. Returns "" or what is wrong.
inline std::string check_plan(const LayoutSpec& L, const Plan& plan) {
  const int Q = L.total_queries(), S = L.num_scales(), N = L.num_patches();
  std::vector<int> q_seen(Q, 0), k_seen(int64_t{S} * N, 0);
  auto walk = [&](const int32_t* tiles, int n, const cos_kernels::LaunchConfig& cfg, bool keys) -> std::string {
    for (int ti = 0; ti < n; ++ti) {
      const int32_t* f = tiles + int64_t{ti} * cos_kernels::kTileInts;
      const int s = f[cos_kernels::kTileScale], nw = f[cos_kernels::kTileNumWin];
      const int rpw = f[cos_kernels::kTileRowsPerWin], cb = f[cos_kernels::kTileColsPerChunk];
      if (nw * rpw > cfg.rows) return "tile " + std::to_string(ti) + " has more rows than the block";
      if (nw * cb > cfg.col_slots || cb < 1) return "tile " + std::to_string(ti) + " overflows the column slots";
      for (int lw = 0; lw < nw; ++lw)
        for (int r = 0; r < rpw; ++r) {
          const int w = f[cos_kernels::kTileWin0] + lw, j = f[cos_kernels::kTileRow0] + r;
          if (keys) {
            const int wcols = f[cos_kernels::kTileWinCols], wr = w / wcols, wc = w % wcols;
            const int y = wr * L.win_h[s] + j / L.win_w[s], x = wc * L.win_w[s] + j % L.win_w[s];
            ++k_seen[int64_t{s} * N + y * L.grid_w + x];
          } else {
            ++q_seen[f[cos_kernels::kTileQOffset] + w * f[cos_kernels::kTileQPerWin] + j];
          }
        }
    }
    return "";
  };
  std::string e = walk(plan.tiles.data(), plan.q.num_tiles, plan.q, false);
  if (e.empty()) e = walk(plan.tiles.data() + plan.k_tile_offset(), plan.k.num_tiles, plan.k, true);
  if (!e.empty()) return e;
  for (int i = 0; i < Q; ++i)
    if (q_seen[i] != 1) return "query " + std::to_string(i) + " is in " + std::to_string(q_seen[i]) + " q-tiles";
  for (int64_t i = 0; i < int64_t{S} * N; ++i)
    if (k_seen[i] != 1) return "key " + std::to_string(i) + " is in " + std::to_string(k_seen[i]) + " k-tiles";
  if (plan.q.threads % 32 || plan.k.threads % 32 || plan.q.threads > cos_kernels::kMaxThreads ||
      plan.k.threads > cos_kernels::kMaxThreads)
    return "block size is not a multiple of 32 or exceeds kMaxThreads";
  return "";
}

// ---- comparison ------------------------------------------------------------------------------------
struct Tolerance {
  double atol, rtol;
};

inline Tolerance tolerance(DType dt) {
  switch (dt) {
    case DType::kFloat16: return {2e-3, 4e-3};
    case DType::kBFloat16: return {1.5e-2, 1.6e-2};
    default: return {2e-5, 1e-4};
  }
}

// |got - ref| <= atol * max(1, max|ref|) + rtol * |ref| everywhere (NaN fails: outputs are poisoned).
inline bool compare(const char* what, const Case& c, const std::vector<double>& ref, const std::vector<float>& got,
                    Tolerance tol) {
  double scale = 1.0;
  for (double x : ref) scale = std::max(scale, std::fabs(x));
  double worst = 0;
  int64_t worst_at = -1, bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - ref[i]);
    const double lim = tol.atol * scale + tol.rtol * std::fabs(ref[i]);
    if (!(err <= lim)) {
      ++bad;
      if (!(err <= worst)) {
        worst = err;
        worst_at = static_cast<int64_t>(i);
      }
    }
  }
  if (std::getenv("COS_TEST_VERBOSE")) {
    double max_err = 0;
    for (size_t i = 0; i < ref.size(); ++i) max_err = std::max(max_err, std::fabs(static_cast<double>(got[i]) - ref[i]));
    std::printf("  %-4s max |error| %.3e (max |ref| %.3e)\n", what, max_err, scale);
  }
  if (bad) {
    std::printf("FAIL %s: %s: %lld of %zu elements out of tolerance; worst at %lld: got %.6g, want %.6g\n",
                c.describe().c_str(), what, static_cast<long long>(bad), ref.size(), static_cast<long long>(worst_at),
                static_cast<double>(got[worst_at]), ref[worst_at]);
    return false;
  }
  return true;
}

inline std::vector<float> decode(DType dt, const std::vector<uint8_t>& bytes, size_t n) {
  std::vector<float> r(n);
  for (size_t i = 0; i < n; ++i) r[i] = load_elt(dt, bytes.data(), static_cast<int64_t>(i));
  return r;
}

// ---- a case's inputs and results, for a check outside C++ ------------------------------------------
// <stem>.txt: "spec <ints>", "B H D <dtype> scale" lines; <stem>.bin: float32 arrays in this order, each
// row-major (logical values): q (B,Q,H,D), k, v (B,S,N,H,D), grad_out (B,Q,H,D), then the kernels'
// out (B,Q,H,D), lse (B,H,Q), dq, dk, dv. tests/test_cuda.py holds them to the 2x-eager rule.
inline bool dump_case(const std::string& stem, const Case& c, const HostData& d,
                      const std::vector<std::vector<float>>& results) {
  FILE* t = std::fopen((stem + ".txt").c_str(), "w");
  if (!t) return false;
  std::fprintf(t, "spec");
  for (int64_t x : c.spec) std::fprintf(t, " %lld", static_cast<long long>(x));
  std::fprintf(t, "\n%d %d %d %s %.9g\n", c.B, c.H, c.D, cos_kernels::dtype_name(c.dt), static_cast<double>(c.scale));
  std::fclose(t);
  FILE* b = std::fopen((stem + ".bin").c_str(), "wb");
  if (!b) return false;
  bool ok = true;
  for (const std::vector<double>* x : {&d.q, &d.k, &d.v, &d.dout}) {
    const std::vector<float> f(x->begin(), x->end());
    ok &= std::fwrite(f.data(), sizeof(float), f.size(), b) == f.size();
  }
  for (const auto& r : results) ok &= std::fwrite(r.data(), sizeof(float), r.size(), b) == r.size();
  return std::fclose(b) == 0 && ok;
}

// ---- one case through a runner -------------------------------------------------------------------
// Runner: void* alloc(size_t); void release(void*); void upload(void*, const void*, size_t);
//         void download(void*, const void*, size_t); void poison(void*, size_t);
//         bool forward(const FwdParams&, DType, const Plan&); bool backward(const BwdParams&, DType, const Plan&);
//         const int32_t* tiles(const Plan&)  (the plan's tile table in the runner's memory)
// dump_stem: where to write the case (dump_case) once it ran, or "" for nowhere.
template <typename Runner>
bool run_case(Runner& rt, const Case& c, std::mt19937_64& rng, bool check_backward, bool check_determinism,
              const std::string& dump_stem = "") {
  const Plan plan = cos_kernels::make_plan(c.L, c.D, c.dt);
  const std::string plan_err = check_plan(c.L, plan);
  if (!plan_err.empty()) {
    std::printf("FAIL %s: plan: %s\n", c.describe().c_str(), plan_err.c_str());
    return false;
  }
  const HostData d = make_data(c, rng);
  const Reference ref = reference(c, d);
  const size_t es = cos_kernels::dtype_size(c.dt);
  const int64_t n_q = int64_t{c.B} * d.Q * c.H * c.D, n_kv = int64_t{c.B} * d.S * d.N * c.H * c.D;
  const int64_t n_lse = int64_t{c.B} * c.H * d.Q;

  void* q = rt.alloc(d.q_store.size());
  void* kv = rt.alloc(d.kv_store.size());
  void* dout = rt.alloc(d.do_store.size());
  void* out = rt.alloc(n_q * es);
  void* lse = rt.alloc(n_lse * 4);
  rt.upload(q, d.q_store.data(), d.q_store.size());
  rt.upload(kv, d.kv_store.data(), d.kv_store.size());
  rt.upload(dout, d.do_store.data(), d.do_store.size());
  rt.poison(out, n_q * es);
  rt.poison(lse, n_lse * 4);
  const int32_t* tiles = rt.tiles(plan);
  const void* k = static_cast<const uint8_t*>(kv) + d.k_offset * es;
  const void* v = static_cast<const uint8_t*>(kv) + d.v_offset * es;

  cos_kernels::FwdParams fp{};
  fp.q = q;
  fp.k = k;
  fp.v = v;
  fp.out = out;
  fp.lse = static_cast<float*>(lse);
  std::copy(d.q_stride, d.q_stride + 4, fp.q_stride);
  std::copy(d.k_stride, d.k_stride + 5, fp.k_stride);
  std::copy(d.v_stride, d.v_stride + 5, fp.v_stride);
  fp.tiles = tiles;
  fp.num_tiles = plan.q.num_tiles;
  fp.batch = c.B;
  fp.heads = c.H;
  fp.head_dim = c.D;
  fp.total_queries = d.Q;
  fp.grid_w = c.L.grid_w;
  fp.col_slots = plan.q.col_slots;
  fp.scale_log2 = c.scale * 1.4426950408889634f;
  fp.q_vec = cos_kernels::can_vec4(q, d.q_stride, 4, c.D, es);
  fp.kv_vec = cos_kernels::can_vec4(k, d.k_stride, 5, c.D, es) && cos_kernels::can_vec4(v, d.v_stride, 5, c.D, es);
  fp.out_vec = c.D % 4 == 0;
  fp.kv_async = cos_kernels::can_copy16(k, d.k_stride, 5, c.D, es) && cos_kernels::can_copy16(v, d.v_stride, 5, c.D, es);

  bool ok = rt.forward(fp, c.dt, plan);
  std::vector<uint8_t> out_bytes(n_q * es), lse_bytes(n_lse * 4);
  std::vector<std::vector<float>> results;  // out, lse, dq, dk, dv as they came back
  if (ok) {
    rt.download(out_bytes.data(), out, out_bytes.size());
    rt.download(lse_bytes.data(), lse, lse_bytes.size());
    const Tolerance tol = tolerance(c.dt);
    ok &= compare("out", c, ref.out, decode(c.dt, out_bytes, n_q), tol);
    ok &= compare("lse", c, ref.lse, decode(DType::kFloat32, lse_bytes, n_lse), Tolerance{2e-6, 1e-5});
    results = {decode(c.dt, out_bytes, n_q), decode(DType::kFloat32, lse_bytes, n_lse)};
  }

  if (ok && check_backward) {
    void* delta = rt.alloc(n_lse * 4);
    void* dq = rt.alloc(n_q * es);
    void* dk = rt.alloc(n_kv * es);
    void* dv = rt.alloc(n_kv * es);
    cos_kernels::BwdParams bp{};
    bp.q = q;
    bp.k = k;
    bp.v = v;
    bp.out = out;
    bp.grad_out = dout;
    bp.lse = static_cast<const float*>(lse);
    bp.delta = static_cast<float*>(delta);
    bp.dq = dq;
    bp.dk = dk;
    bp.dv = dv;
    std::copy(d.q_stride, d.q_stride + 4, bp.q_stride);
    const int64_t contiguous_q[4] = {int64_t{d.Q} * c.H * c.D, int64_t{c.H} * c.D, c.D, 1};
    std::copy(contiguous_q, contiguous_q + 4, bp.o_stride);
    std::copy(d.do_stride, d.do_stride + 4, bp.do_stride);
    std::copy(d.k_stride, d.k_stride + 5, bp.k_stride);
    std::copy(d.v_stride, d.v_stride + 5, bp.v_stride);
    bp.q_tiles = tiles;
    bp.k_tiles = tiles + plan.k_tile_offset();
    bp.num_q_tiles = plan.q.num_tiles;
    bp.num_k_tiles = plan.k.num_tiles;
    bp.batch = c.B;
    bp.heads = c.H;
    bp.head_dim = c.D;
    bp.total_queries = d.Q;
    bp.num_scales = d.S;
    bp.num_patches = d.N;
    bp.grid_w = c.L.grid_w;
    bp.q_col_slots = plan.q.col_slots;
    bp.k_col_slots = plan.k.col_slots;
    bp.scale = c.scale;
    bp.scale_log2 = c.scale * 1.4426950408889634f;
    bp.q_vec = fp.q_vec;
    bp.kv_vec = fp.kv_vec;
    bp.o_vec = c.D % 4 == 0;
    bp.do_vec = cos_kernels::can_vec4(dout, d.do_stride, 4, c.D, es);
    bp.dq_vec = c.D % 4 == 0;
    bp.dkv_vec = c.D % 4 == 0;
    bp.kv_async = fp.kv_async;
    bp.q_async = cos_kernels::can_copy16(q, d.q_stride, 4, c.D, es);
    bp.do_async = cos_kernels::can_copy16(dout, d.do_stride, 4, c.D, es);

    std::vector<std::vector<uint8_t>> first;
    for (int run = 0; run < (check_determinism ? 2 : 1) && ok; ++run) {
      rt.poison(delta, n_lse * 4);
      rt.poison(dq, n_q * es);
      rt.poison(dk, n_kv * es);
      rt.poison(dv, n_kv * es);
      ok &= rt.backward(bp, c.dt, plan);
      if (!ok) break;
      std::vector<uint8_t> gq(n_q * es), gk(n_kv * es), gv(n_kv * es);
      rt.download(gq.data(), dq, gq.size());
      rt.download(gk.data(), dk, gk.size());
      rt.download(gv.data(), dv, gv.size());
      if (run == 0) {
        const Tolerance tol = tolerance(c.dt);
        ok &= compare("dq", c, ref.dq, decode(c.dt, gq, n_q), tol);
        ok &= compare("dk", c, ref.dk, decode(c.dt, gk, n_kv), tol);
        ok &= compare("dv", c, ref.dv, decode(c.dt, gv, n_kv), tol);
        first = {gq, gk, gv};
        for (const auto* g : {&gq, &gk, &gv}) results.push_back(decode(c.dt, *g, g == &gq ? n_q : n_kv));
      } else if (first[0] != gq || first[1] != gk || first[2] != gv) {
        std::printf("FAIL %s: backward is not bitwise deterministic\n", c.describe().c_str());
        ok = false;
      }
    }
    rt.release(delta);
    rt.release(dq);
    rt.release(dk);
    rt.release(dv);
  }
  rt.release(q);
  rt.release(kv);
  rt.release(dout);
  rt.release(out);
  rt.release(lse);
  if (!dump_stem.empty() && results.size() == 5 && !dump_case(dump_stem, c, d, results)) {
    std::printf("FAIL %s: could not write %s.txt / .bin\n", c.describe().c_str(), dump_stem.c_str());
    ok = false;
  }
  return ok;
}

// The cases both tests run: fixed ones covering every code path, then `n_random` random ones.
inline std::vector<Case> standard_cases(std::mt19937_64& rng, int n_random, bool include_large) {
  std::vector<Case> cases;
  const DType f32 = DType::kFloat32, f16 = DType::kFloat16, bf16 = DType::kBFloat16;
  // cos-80 at 224 px: one 16x16 window (16 queries) + sixteen 4x4 windows (4 queries each).
  cases.push_back(make_case("cos-80", {16, 16, 16, 16, 16, 4, 4, 64}, 1, 2, 64, f32, 0, 1, rng));
  cases.push_back(make_case("cos-80", {16, 16, 16, 16, 16, 4, 4, 64}, 2, 1, 64, bf16, 1, 1, rng));
  cases.push_back(make_case("cos-80", {16, 16, 16, 16, 16, 4, 4, 64}, 1, 1, 128, f16, 0, 0, rng));
  if (include_large) {
    cases.push_back(make_case("cos-1296", {32, 32, 32, 32, 16, 8, 8, 256, 2, 2, 1024}, 1, 1, 64, bf16, 0, 1, rng));
    cases.push_back(make_case("resampler-336", {16, 16, 16, 16, 336}, 1, 1, 64, f16, 2, 0, rng));
  }
  // shrunk presets, rectangular windows, odd head dims (scalar paths), dim-strided K/V, head-major q
  cases.push_back(make_case("shrunk", {8, 8, 8, 8, 4, 4, 4, 16, 2, 2, 64}, 2, 2, 40, f32, 2, 2, rng));
  cases.push_back(make_case("rect", {6, 9, 3, 9, 4, 2, 3, 18, 1, 1, 54}, 1, 3, 17, f16, 1, 0, rng));
  cases.push_back(make_case("rect", {4, 10, 2, 5, 12, 4, 1, 30}, 3, 1, 16, bf16, 0, 2, rng));
  cases.push_back(make_case("many-q", {4, 4, 4, 4, 70, 2, 2, 8}, 1, 2, 100, f32, 0, 1, rng));
  cases.push_back(make_case("one-patch", {3, 5, 1, 1, 15, 3, 5, 2}, 2, 1, 33, bf16, 2, 0, rng));
  const int dims[] = {16, 40, 64, 128, 17, 24, 33, 72, 100};
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  for (int i = 0; i < n_random; ++i) {
    const DType dt = static_cast<DType>(pick(0, 2));
    cases.push_back(make_case("random", random_spec(rng), pick(1, 3), pick(1, 4), dims[pick(0, 8)], dt, pick(0, 2),
                              pick(0, 2), rng));
  }
  return cases;
}

}  // namespace cos_test
