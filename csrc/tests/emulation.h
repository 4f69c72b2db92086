// CPU emulation of CUDA thread blocks, to run the kernels' logic where no GPU exists (CI).
//
// Include this header BEFORE any kernel header, in a translation unit compiled by a host C++ compiler
// (not nvcc). Every CUDA thread of a block runs as a fiber (ucontext) on one OS thread; a fiber runs
// until it reaches a synchronisation point (__syncthreads or a warp shuffle), and the scheduler runs
// every fiber of the block to its next point before any goes further: lockstep at barriers, as on a
// GPU, with no data races on the emulated shared memory. It checks what a GPU would not forgive:
//   - all threads of the block reach the same sequence of barriers (no __syncthreads or shuffle in
//     divergent code, no thread returning while others wait at a barrier);
//   - full-warp shuffles with the full mask and a block size that is a multiple of 32.
// Dynamic shared memory is filled with NaN before each block, so a read of a slot that was never
// written shows up in the results.
#pragma once

#include <ucontext.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <functional>
#include <limits>
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

enum class Point : int { kRunning = 0, kSync = 1, kShuffleWrite = 2, kShuffleRead = 3, kDone = 4 };

struct BlockState {
  int nthreads = 0;
  int current = 0;
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  std::vector<Point> at;
  std::vector<float> shuffle;
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
    std::fill(s.smem.begin(), s.smem.end(), std::numeric_limits<float>::quiet_NaN());
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
