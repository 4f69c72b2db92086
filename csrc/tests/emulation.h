// CPU emulation of CUDA thread blocks, to run the kernels' logic where no GPU exists (CI).
//
// Include this header BEFORE any kernel header, in a translation unit compiled by a host C++ compiler
// (not nvcc). Every CUDA thread of a block runs as a fiber (ucontext) on one OS thread; a fiber runs
// until it reaches a synchronisation point (__syncthreads or a warp shuffle), and the scheduler runs
// every fiber of the block to its next point before any goes further: lockstep at barriers, as on a
// GPU, with no data races on the emulated shared memory. It checks what a GPU would not forgive:
//   - all threads of the block reach the same sequence of barriers (no __syncthreads, shuffle or warp
//     collective in divergent code, no thread returning while others wait at a barrier);
//   - full-warp shuffles with the full mask and a block size that is a multiple of 32;
//   - ldmatrix rows and cp.async destinations inside the block's shared memory, 16-byte aligned;
//     no cp.async still in flight when a thread returns.
// The tensor-core instructions of ../kernels/mma.cuh are modelled on the PTX ISA's fragment layouts:
// mma.m16n8k16 and ldmatrix are warp collectives (every lane deposits its registers or row address,
// a warp-wide sync point, then each lane takes its part of the result); cp.async copies are queued per
// thread and land only when a cp.async.wait_group of that thread retires their group, so a read before
// the wait (or before the barrier after it, for another thread's copies) sees stale data.
// Dynamic shared memory is filled with 0xff bytes (NaN as fp32, fp16 and bf16) before each block, so a
// read of a slot that was never written shows up in the results.
#pragma once

#include <ucontext.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <vector>

#if defined(__CUDACC__)
#error "emulation.h is for host compilers only (compile the emulation test with g++/clang++, not nvcc)"
#endif

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif

#define COS_CHECK_ALIGNED(ptr, bytes) ::cos_emu::check_aligned(ptr, bytes)

inline uint3 threadIdx, blockIdx, blockDim, gridDim;

namespace cos_emu {

enum class Point : int {
  kRunning = 0,
  kSync,
  kShuffleWrite,
  kShuffleRead,
  kWarpWrite,  // a warp collective (mma, ldmatrix): every lane has deposited its operands
  kWarpRead,   // ... and every lane has taken its result
  kDone
};

// One thread's cp.async copies: the open group, then committed groups oldest first.
struct AsyncCopies {
  struct Copy {
    void* dst;
    const void* src;
  };
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> committed;
};

constexpr int kLaneSlots = 10;  // 32-bit operands one lane deposits for a warp collective (mma: 4 + 2 + 4)

struct BlockState {
  int nthreads = 0;
  int current = 0;
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  std::vector<Point> at;
  std::vector<float> shuffle;
  std::vector<std::array<uint32_t, kLaneSlots>> lanes;  // warp-collective operands, per thread
  std::vector<const void*> lane_addr;                   // ldmatrix row addresses, per thread
  std::vector<AsyncCopies> copies;                      // cp.async queues, per thread
  std::vector<float> smem;
  ucontext_t scheduler;
  std::function<void()> kernel;
  uint64_t barrier_rounds = 0;
};

inline BlockState& state() {
  static BlockState s;
  return s;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s (block %u, thread %d)\n", what, blockIdx.x, state().current);
  std::abort();
}

inline float* dynamic_smem() { return state().smem.data(); }

inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes) fail("misaligned vector access (a GPU would fault)");
}

inline void yield(Point p) {
  BlockState& s = state();
  const int i = s.current;
  s.at[i] = p;
  if (swapcontext(&s.ctx[i], &s.scheduler) != 0) fail("swapcontext failed");
}

inline void fiber_entry() {
  BlockState& s = state();
  s.kernel();
  const AsyncCopies& c = s.copies[s.current];
  if (!c.open.empty() || !c.committed.empty()) fail("thread returned with cp.async copies still in flight");
  s.at[s.current] = Point::kDone;
  setcontext(&s.scheduler);  // never returns
}

// Runs one block: every fiber to its next synchronisation point, round after round.
inline void run_block() {
  BlockState& s = state();
  const int n = s.nthreads;
  for (int i = 0; i < n; ++i) {
    if (getcontext(&s.ctx[i]) != 0) fail("getcontext failed");
    s.ctx[i].uc_stack.ss_sp = s.stacks[i].data();
    s.ctx[i].uc_stack.ss_size = s.stacks[i].size();
    s.ctx[i].uc_link = nullptr;
    makecontext(&s.ctx[i], fiber_entry, 0);
    s.at[i] = Point::kRunning;
  }
  for (;;) {
    for (int i = 0; i < n; ++i) {
      if (s.at[i] == Point::kDone) continue;
      s.current = i;
      threadIdx = uint3{static_cast<unsigned>(i), 0u, 0u};
      if (swapcontext(&s.scheduler, &s.ctx[i]) != 0) fail("swapcontext failed");
    }
    ++s.barrier_rounds;
    int done = 0;
    for (int i = 0; i < n; ++i) done += s.at[i] == Point::kDone;
    if (done == n) return;
    if (done != 0) fail("some threads returned while others wait at a barrier or shuffle");
    for (int i = 1; i < n; ++i)
      if (s.at[i] != s.at[0]) {
        s.current = i;
        fail("threads of one block reached different synchronisation points (divergent barrier)");
      }
  }
}

// Emulated kernel launch: grid x block threads (1-D), dynamic shared memory of smem_bytes.
inline void launch(unsigned grid, unsigned block, size_t smem_bytes, std::function<void()> kernel) {
  BlockState& s = state();
  if (block == 0 || block % 32 != 0 || block > 1024) fail("block size must be a positive multiple of 32, <= 1024");
  s.nthreads = static_cast<int>(block);
  s.ctx.resize(block);
  s.at.assign(block, Point::kRunning);
  s.shuffle.assign(block, 0.f);
  s.lanes.assign(block, {});
  s.lane_addr.assign(block, nullptr);
  s.copies.assign(block, {});
  if (s.stacks.size() < block) s.stacks.resize(block);
  for (auto& st : s.stacks)
    if (st.size() < (256u << 10)) st.resize(256u << 10);
  s.kernel = std::move(kernel);
  gridDim = uint3{grid, 1u, 1u};
  blockDim = uint3{block, 1u, 1u};
  // Exactly smem_bytes, freshly allocated, so AddressSanitizer builds catch out-of-bounds slots.
  std::vector<float>((smem_bytes + sizeof(float) - 1) / sizeof(float)).swap(s.smem);
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx = uint3{b, 0u, 0u};
    std::memset(static_cast<void*>(s.smem.data()), 0xff, s.smem.size() * sizeof(float));  // NaN in every dtype
    run_block();
  }
}

}  // namespace cos_emu

inline void __syncthreads() { cos_emu::yield(cos_emu::Point::kSync); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  cos_emu::BlockState& s = cos_emu::state();
  if (mask != 0xffffffffu) cos_emu::fail("only full-warp shuffles are emulated");
  if (lane_mask <= 0 || lane_mask >= 32) cos_emu::fail("shuffle lane mask out of range");
  const int i = s.current;
  s.shuffle[i] = v;
  cos_emu::yield(cos_emu::Point::kShuffleWrite);  // every lane has written
  const float r = s.shuffle[(i & ~31) | ((i & 31) ^ lane_mask)];
  cos_emu::yield(cos_emu::Point::kShuffleRead);  // every lane has read
  return r;
}

// ---- tensor-core instructions (../kernels/mma.cuh), modelled on the PTX ISA ---------------------
namespace cos_emu {

inline float half_bits_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t w = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &w, 4);
    return f;
  }
  __half h;
  std::memcpy(static_cast<void*>(&h), &bits, 2);
  return __half2float(h);
}

inline uint16_t half_of(uint32_t reg, int k) { return static_cast<uint16_t>(k ? reg >> 16 : reg & 0xffffu); }

inline bool in_smem(const void* p, size_t bytes) {
  const BlockState& s = state();
  const char* lo = reinterpret_cast<const char*>(s.smem.data());
  const char* c = static_cast<const char*>(p);
  return c >= lo && c + bytes <= lo + s.smem.size() * sizeof(float);
}

// The 32 lanes of this thread's warp deposit `n` operands each; returns the warp's first thread.
inline int warp_deposit(const uint32_t* ops, int n) {
  BlockState& s = state();
  const int i = s.current;
  std::copy(ops, ops + n, s.lanes[i].begin());
  yield(Point::kWarpWrite);  // every lane has deposited
  return i & ~31;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d += A * B for the warp's fragments (see mma.cuh for
// the layouts). Products of 16-bit values are exact in double; the sum is rounded once to fp32.
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
  uint32_t ops[kLaneSlots];
  std::copy(a, a + 4, ops);
  std::copy(b, b + 2, ops + 4);
  std::memcpy(ops + 6, d, sizeof(d));
  const int w0 = warp_deposit(ops, kLaneSlots);
  const BlockState& s = state();
  auto A = [&](int row, int k) {  // A[row][k]: lane (row % 8) * 4 + (k % 8) / 2, register row / 8 + 2 (k / 8)
    return half_bits_to_float(half_of(s.lanes[w0 + (row % 8) * 4 + (k % 8) / 2][row / 8 + 2 * (k / 8)], k % 2), bf16);
  };
  auto B = [&](int k, int n) {  // B[k][n]: lane n * 4 + (k % 8) / 2, register 4 + k / 8
    return half_bits_to_float(half_of(s.lanes[w0 + n * 4 + (k % 8) / 2][4 + k / 8], k % 2), bf16);
  };
  const int lane = s.current & 31, g = lane / 4, t = lane % 4;
  float r[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    double acc = d[i];
    for (int k = 0; k < 16; ++k) acc += static_cast<double>(A(row, k)) * B(k, col);
    r[i] = static_cast<float>(acc);
  }
  yield(Point::kWarpRead);  // every lane has read the deposits
  std::copy(r, r + 4, d);
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the row address of row l % 8 of matrix l / 8.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  BlockState& s = state();
  const int i = s.current;
  if (!in_smem(row, 16)) fail("ldmatrix row address outside the block's shared memory");
  check_aligned(row, 16);
  s.lane_addr[i] = row;
  yield(Point::kWarpWrite);
  const int w0 = i & ~31, lane = i & 31, g = lane / 4, t = lane % 4;
  auto elt = [&](int m, int rr, int c) {  // element (rr, c) of matrix m
    uint16_t v;
    std::memcpy(&v, static_cast<const char*>(s.lane_addr[w0 + 8 * m + rr]) + 2 * c, 2);
    return static_cast<uint32_t>(v);
  };
  uint32_t out[4];
  for (int m = 0; m < 4; ++m)
    out[m] = trans ? (elt(m, 2 * t, g) | elt(m, 2 * t + 1, g) << 16) : (elt(m, g, 2 * t) | elt(m, g, 2 * t + 1) << 16);
  yield(Point::kWarpRead);
  std::copy(out, out + 4, r);
}

// cp.async.cg.shared.global, 16 bytes: queued in this thread's open group.
inline void cp_async16(void* dst, const void* src) {
  if (!in_smem(dst, 16)) fail("cp.async destination outside the block's shared memory");
  check_aligned(dst, 16);
  check_aligned(src, 16);
  state().copies[state().current].open.push_back({dst, src});
}

inline void cp_async_commit() {
  AsyncCopies& c = state().copies[state().current];
  c.committed.push_back(std::move(c.open));
  c.open.clear();
}

// cp.async.wait_group n: the copies of all but the newest n committed groups land now.
inline void cp_async_wait(int n) {
  AsyncCopies& c = state().copies[state().current];
  while (static_cast<int>(c.committed.size()) > n) {
    for (const AsyncCopies::Copy& x : c.committed.front()) std::memcpy(x.dst, x.src, 16);
    c.committed.pop_front();
  }
}

}  // namespace cos_emu
