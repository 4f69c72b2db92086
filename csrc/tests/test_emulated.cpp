// CPU emulation test of the CUDA kernels: runs the very kernel templates of ../kernels/*.cuh on the
// CPU (emulation.h: every CUDA thread a fiber, lockstep at barriers and shuffles) and checks forward
// and backward against the float64 loop reference of harness.h. Needs no GPU: CI runs it.
//
//   g++ -std=c++20 -O1 -I<cuda>/include csrc/tests/test_emulated.cpp -o test_emulated && ./test_emulated [N] [seed]
// First the emulated instructions alone (primitives.h). With COS_EMULATION_DUMP=<folder>, every case's
// inputs and results are also written there (harness.h dump_case) for tests/test_cuda.py's 2x-eager check.
#include "emulation.h"  // first: defines threadIdx, __syncthreads, __shfl_xor_sync, shared memory

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>

#include "../kernels/dispatch.h"
#include "../kernels/kernels.cuh"
#include "harness.h"
#include "primitives.h"

namespace {

using namespace cos_kernels;

struct EmulatedRunner {
  std::map<const Plan*, std::vector<int32_t>> tables;
  void* alloc(size_t n) { return std::malloc(n ? n : 1); }
  void release(void* p) { std::free(p); }
  void upload(void* dst, const void* src, size_t n) { std::memcpy(dst, src, n); }
  void download(void* dst, const void* src, size_t n) { std::memcpy(dst, src, n); }
  void poison(void* p, size_t n) { std::memset(p, 0xff, n); }  // NaN in fp32, fp16 and bf16
  const int32_t* tiles(const Plan& plan) { return plan.tiles.data(); }

  bool forward(const FwdParams& p, DType dt, const Plan& plan) {
    const unsigned blocks = detail::num_blocks(plan.q.num_tiles, p.batch, p.heads);
    return detail::dispatch_kernel(dt, plan.group, [&](auto type_tag, auto group) -> cudaError_t {
             using T = typename decltype(type_tag)::type;
             constexpr int G = decltype(group)::value;
             cos_emu::launch(blocks, plan.q.threads, plan.q.smem_bytes,
                             [&] { detail::forward_kernel<T, G>()(p); });
             return cudaSuccess;
           }) == cudaSuccess;
  }

  bool backward(const BwdParams& p, DType dt, const Plan& plan) {
    const unsigned q_blocks = detail::num_blocks(plan.q.num_tiles, p.batch, p.heads);
    const unsigned k_blocks = detail::num_blocks(plan.k.num_tiles, p.batch, p.heads);
    return detail::dispatch_kernel(dt, plan.group, [&](auto type_tag, auto group) -> cudaError_t {
             using T = typename decltype(type_tag)::type;
             constexpr int G = decltype(group)::value;
             cos_emu::launch(q_blocks, plan.q.threads, plan.q.smem_bytes,
                             [&] { detail::dq_kernel<T, G>()(p); });
             cos_emu::launch(k_blocks, plan.k.threads, plan.k.smem_bytes,
                             [&] { detail::dkv_kernel<T, G>()(p); });
             return cudaSuccess;
           }) == cudaSuccess;
  }
};

}  // namespace

int main(int argc, char** argv) {
  const int n_random = argc > 1 ? std::atoi(argv[1]) : 24;
  const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10)
                                 : static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  const bool large = std::getenv("COS_EMULATION_LARGE") != nullptr;
  const char* dump = std::getenv("COS_EMULATION_DUMP");
  std::printf("cuda kernel emulation test: seed %llu, %d random cases%s\n", static_cast<unsigned long long>(seed),
              n_random, large ? " (+ full-size presets)" : "");
  std::mt19937_64 rng(seed);
  EmulatedRunner runner;
  int failed = !cos_test::check_primitives(rng), total = 1;  // the instructions first, then the kernels
  for (const auto& c : cos_test::standard_cases(rng, n_random, large)) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::string stem = dump ? std::string(dump) + "/case_" + std::to_string(total) : std::string();
    const bool ok = cos_test::run_case(runner, c, rng, /*check_backward=*/true, /*check_determinism=*/false, stem);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%s %s (%.0f ms)\n", ok ? "ok  " : "FAIL", c.describe().c_str(), ms);
    failed += !ok;
    ++total;
  }
  std::printf("%d of %d cases passed (seed %llu)\n", total - failed, total, static_cast<unsigned long long>(seed));
  return failed ? 1 : 0;
}
