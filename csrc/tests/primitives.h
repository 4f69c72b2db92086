// Tests of the emulated tensor-core instructions and of the fragment helpers built on them, each
// against a plain matrix product or a plain read (double precision), before any kernel uses them.
// Included by test_emulated.cpp after emulation.h and the kernel headers.
//
// The fragment layouts are written here a second time, from the PTX ISA's figures, as maps from
// (lane, register, half) to (row, column): the emulation (emulation.h) maps the other way, from a
// matrix element to the lane and register holding it, so a slip in either shows.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "harness.h"

namespace cos_test {

// PTX ISA, mma.m16n8k16 .f16/.bf16: lane l, g = l / 4, t = l % 4.
inline void a_frag_pos(int lane, int reg, int half, int* row, int* col) {  // A: 16 x 16
  *row = lane / 4 + 8 * (reg % 2);
  *col = 2 * (lane % 4) + half + 8 * (reg / 2);
}
inline void b_frag_pos(int lane, int reg, int half, int* k, int* n) {  // B: 16 x 8
  *k = 2 * (lane % 4) + half + 8 * reg;
  *n = lane / 4;
}
inline void c_frag_pos(int lane, int i, int* row, int* col) {  // C, D: 16 x 8
  *row = lane / 4 + 8 * (i / 2);
  *col = 2 * (lane % 4) + i % 2;
}

template <typename T>
uint16_t to_bits(float x) {
  const T h = cos_kernels::detail::Elt<T>::from_float(x);
  uint16_t b;
  std::memcpy(&b, static_cast<const void*>(&h), 2);
  return b;
}

template <typename T>
float from_bits(uint16_t b) {
  T h;
  std::memcpy(static_cast<void*>(&h), &b, 2);
  return cos_kernels::detail::Elt<T>::to_float(h);
}

inline bool close(const char* what, double got, double want, double tol) {
  if (std::fabs(got - want) <= tol * (1.0 + std::fabs(want))) return true;
  std::printf("FAIL primitives: %s: got %.8g, want %.8g\n", what, got, want);
  return false;
}

// One m16n8k16 product on fragments built from the PTX layouts, vs the plain product.
template <typename T>
bool check_mma(std::mt19937_64& rng, const char* name) {
  std::normal_distribution<float> normal(0.f, 1.f);
  const DType dt = std::is_same_v<T, __half> ? DType::kFloat16 : DType::kBFloat16;
  float A[16][16], B[16][8], Cm[16][8];
  for (auto& r : A) for (float& x : r) x = round_to(dt, normal(rng));
  for (auto& r : B) for (float& x : r) x = round_to(dt, normal(rng));
  for (auto& r : Cm) for (float& x : r) x = normal(rng);
  float D[16][8];
  cos_emu::launch(1, 32, 16, [&] {
    const int lane = threadIdx.x;
    uint32_t a[4], b[2];
    float d[4];
    for (int reg = 0; reg < 4; ++reg) {
      uint32_t w = 0;
      for (int half = 0; half < 2; ++half) {
        int r, c;
        a_frag_pos(lane, reg, half, &r, &c);
        w |= uint32_t{to_bits<T>(A[r][c])} << (16 * half);
      }
      a[reg] = w;
    }
    for (int reg = 0; reg < 2; ++reg) {
      uint32_t w = 0;
      for (int half = 0; half < 2; ++half) {
        int k, n;
        b_frag_pos(lane, reg, half, &k, &n);
        w |= uint32_t{to_bits<T>(B[k][n])} << (16 * half);
      }
      b[reg] = w;
    }
    for (int i = 0; i < 4; ++i) {
      int r, c;
      c_frag_pos(lane, i, &r, &c);
      d[i] = Cm[r][c];
    }
    cos_kernels::detail::mma_16816<T>(d, a, b);
    for (int i = 0; i < 4; ++i) {
      int r, c;
      c_frag_pos(lane, i, &r, &c);
      D[r][c] = d[i];
    }
  });
  bool ok = true;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 8; ++c) {
      double want = Cm[r][c];
      for (int k = 0; k < 16; ++k) want += static_cast<double>(A[r][k]) * B[k][c];
      ok &= close(name, D[r][c], want, 1e-6);
    }
  return ok;
}

// ldmatrix .x4 (and .trans) from rows scattered over shared memory, vs plain reads of the matrices.
inline bool check_ldmatrix(std::mt19937_64& rng, bool trans) {
  std::uniform_int_distribution<int> bits(0, 0xffff);
  constexpr int kRows = 64, kStride = 24;  // 64 candidate rows of 24 elements (48 bytes, 16-byte aligned)
  std::vector<uint16_t> host(kRows * kStride);
  for (uint16_t& x : host) x = static_cast<uint16_t>(bits(rng));
  int row_of[32], col_of[32];  // lane l gives row (l % 8) of matrix l / 8: a random row, a random 8-element column block
  for (int l = 0; l < 32; ++l) {
    row_of[l] = std::uniform_int_distribution<int>(0, kRows - 1)(rng);
    col_of[l] = 8 * std::uniform_int_distribution<int>(0, kStride / 8 - 1)(rng);
  }
  uint32_t got[32][4];
  cos_emu::launch(1, 32, host.size() * 2, [&] {
    const int lane = threadIdx.x;
    uint16_t* smem = reinterpret_cast<uint16_t*>(cos_emu::dynamic_smem());
    if (lane == 0) std::memcpy(smem, host.data(), host.size() * 2);
    __syncthreads();
    uint32_t r[4];
    const uint16_t* row = smem + row_of[lane] * kStride + col_of[lane];
    if (trans) cos_kernels::detail::ldmatrix_x4<true>(r, row);
    else cos_kernels::detail::ldmatrix_x4<false>(r, row);
    std::memcpy(got[lane], r, sizeof(r));
  });
  auto M = [&](int m, int rr, int c) {  // element (rr, c) of matrix m
    const int l = 8 * m + rr;
    return uint32_t{host[row_of[l] * kStride + col_of[l] + c]};
  };
  for (int l = 0; l < 32; ++l)
    for (int m = 0; m < 4; ++m) {
      const int g = l / 4, t = l % 4;
      const uint32_t want = trans ? (M(m, 2 * t, g) | M(m, 2 * t + 1, g) << 16) : (M(m, g, 2 * t) | M(m, g, 2 * t + 1) << 16);
      if (got[l][m] != want) {
        std::printf("FAIL primitives: ldmatrix%s lane %d matrix %d: got %08x, want %08x\n", trans ? ".trans" : "", l,
                    m, got[l][m], want);
        return false;
      }
    }
  return true;
}

// The kernels' fragment helpers chained as in the kernels, for head dims 16 G: S = X Y^T (A from
// global rows, load_a_rows; B from staged rows, mma_scores), then O = round(S) Y (pack_a, mma_rows),
// stored by store_c_rows; vs the plain products. Y has 16 staged rows at stride RS.
template <typename T, int G>
bool check_chain(std::mt19937_64& rng, const char* name) {
  constexpr int DP = 16 * G, RS = DP + cos_kernels::kTcRowPad;
  const DType dt = std::is_same_v<T, __half> ? DType::kFloat16 : DType::kBFloat16;
  std::normal_distribution<float> normal(0.f, 0.25f);
  std::vector<T> X(16 * DP), Y(16 * DP);
  std::vector<float> xf(16 * DP), yf(16 * DP);
  for (int i = 0; i < 16 * DP; ++i) {
    xf[i] = round_to(dt, normal(rng));
    yf[i] = round_to(dt, normal(rng));
    X[i] = cos_kernels::detail::Elt<T>::from_float(xf[i]);
    Y[i] = cos_kernels::detail::Elt<T>::from_float(yf[i]);
  }
  std::vector<T> S(16 * 16), O(16 * DP);
  cos_emu::launch(1, 32, 16 * RS * sizeof(T), [&] {
    using namespace cos_kernels::detail;
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    T* ys = reinterpret_cast<T*>(cos_emu::dynamic_smem());
    for (int i = lane; i < 16 * DP; i += 32) ys[(i / DP) * RS + i % DP] = Y[i];
    __syncthreads();
    uint32_t a[G][4];
    load_a_rows<T, G>(a, X.data() + g * DP, X.data() + (g + 8) * DP, 1, DP, t);
    float s[2][4] = {};
    mma_scores<T, G, RS>(s, a, ys, 0, lane);
    store_c_rows<T, 1>(S.data() + g * 16, S.data() + (g + 8) * 16, s, 1.f, 16, t);  // S: 16 x 16
    uint32_t pa[4];
    pack_a<T>(pa, s[0], s[1]);
    float o[2 * G][4] = {};
    mma_rows<T, G, RS>(o, pa, ys, 0, lane);
    store_c_rows<T, G>(O.data() + g * DP, O.data() + (g + 8) * DP, o, 1.f, DP, t);
  });
  bool ok = true;
  const double tol = dt == DType::kBFloat16 ? 8e-3 : 1e-3;  // one rounding to T, from fp32 or from double
  std::vector<double> s_ref(16 * 16);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      double a = 0;
      for (int d = 0; d < DP; ++d) a += static_cast<double>(xf[i * DP + d]) * yf[j * DP + d];
      s_ref[i * 16 + j] = a;
      ok &= close(name, cos_kernels::detail::Elt<T>::to_float(S[i * 16 + j]), round_to(dt, static_cast<float>(a)), tol);
    }
  for (int i = 0; i < 16; ++i)
    for (int d = 0; d < DP; ++d) {
      double a = 0;  // P = S rounded to T, as pack_a does
      for (int j = 0; j < 16; ++j) a += static_cast<double>(round_to(dt, static_cast<float>(s_ref[i * 16 + j]))) * yf[j * DP + d];
      ok &= close(name, cos_kernels::detail::Elt<T>::to_float(O[i * DP + d]), round_to(dt, static_cast<float>(a)), tol);
    }
  return ok;
}

// cp.async: copies land only when a wait retires their group (wait_group 1 leaves the newest).
inline bool check_cp_async() {
  alignas(16) uint32_t src[2][32 * 4];
  for (int i = 0; i < 2 * 32 * 4; ++i) src[i / 128][i % 128] = 0x01000000u + i;
  bool ok = true;
  cos_emu::launch(1, 32, sizeof(src), [&] {
    using namespace cos_kernels::detail;
    const int lane = threadIdx.x;
    uint32_t* smem = reinterpret_cast<uint32_t*>(cos_emu::dynamic_smem());
    for (int grp = 0; grp < 2; ++grp) {
      cp_async16(smem + grp * 128 + lane * 4, src[grp] + lane * 4);
      cp_async_commit();
    }
    auto landed = [&](int grp) { return std::memcmp(smem + grp * 128 + lane * 4, src[grp] + lane * 4, 16) == 0; };
    if (landed(0) || landed(1)) ok = false;  // nothing before a wait
    cp_async_wait<1>();
    if (!landed(0) || landed(1)) ok = false;  // the older group only
    cp_async_wait<0>();
    if (!landed(1)) ok = false;
  });
  if (!ok) std::printf("FAIL primitives: cp.async groups land out of order\n");
  return ok;
}

inline bool check_primitives(std::mt19937_64& rng) {
  bool ok = check_mma<__half>(rng, "mma f16") && check_mma<__nv_bfloat16>(rng, "mma bf16");
  ok &= check_ldmatrix(rng, false) && check_ldmatrix(rng, true);
  ok &= check_chain<__half, 1>(rng, "chain f16 G=1") && check_chain<__half, 2>(rng, "chain f16 G=2");
  ok &= check_chain<__half, 4>(rng, "chain f16 G=4") && check_chain<__half, 8>(rng, "chain f16 G=8");
  ok &= check_chain<__nv_bfloat16, 1>(rng, "chain bf16 G=1") && check_chain<__nv_bfloat16, 4>(rng, "chain bf16 G=4");
  ok &= check_chain<__nv_bfloat16, 8>(rng, "chain bf16 G=8");
  ok &= check_cp_async();
  std::printf("%s primitives: mma.m16n8k16 (f16, bf16), ldmatrix.x4 (.trans), fragment chains G=1..8, cp.async\n",
              ok ? "ok  " : "FAIL");
  return ok;
}

}  // namespace cos_test
