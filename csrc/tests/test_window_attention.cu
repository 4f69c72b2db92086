// GPU test of the kernels alone (no torch): forward (out, lse) and backward (dq, dk, dv) on random
// layouts and strided inputs against the float64 CPU loop of harness.h; the backward is also run twice
// and must be bitwise identical. Registered with ctest by CMakeLists.txt.
//
//   test_window_attention [N random cases, default 40] [seed]
// Exit code 0: all passed; 1: a case failed; 77: no CUDA device (ctest reports it as skipped).
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>

#include "../kernels/window_attention.h"
#include "harness.h"

namespace {

using namespace cos_kernels;

#define CHECK_CUDA(expr)                                                                                  \
  do {                                                                                                    \
    const cudaError_t err_ = (expr);                                                                      \
    if (err_ != cudaSuccess) {                                                                            \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                       \
    }                                                                                                     \
  } while (0)

struct GpuRunner {
  std::map<const Plan*, void*> tables;
  void* alloc(size_t n) {
    void* p = nullptr;
    CHECK_CUDA(cudaMalloc(&p, n ? n : 1));
    return p;
  }
  void release(void* p) { CHECK_CUDA(cudaFree(p)); }
  void upload(void* dst, const void* src, size_t n) { CHECK_CUDA(cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice)); }
  void download(void* dst, const void* src, size_t n) {
    CHECK_CUDA(cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost));
  }
  void poison(void* p, size_t n) { CHECK_CUDA(cudaMemset(p, 0xff, n)); }  // NaN in fp32, fp16 and bf16
  const int32_t* tiles(const Plan& plan) {
    void*& t = tables[&plan];
    if (t) CHECK_CUDA(cudaFree(t));
    const size_t bytes = plan.tiles.size() * sizeof(int32_t);
    t = alloc(bytes);
    upload(t, plan.tiles.data(), bytes);
    return static_cast<const int32_t*>(t);
  }
  bool finish(cudaError_t launch, const char* what) {
    if (launch == cudaSuccess) launch = cudaDeviceSynchronize();
    if (launch != cudaSuccess) {
      std::printf("FAIL %s: %s\n", what, cudaGetErrorString(launch));
      return false;
    }
    return true;
  }
  bool forward(const FwdParams& p, DType dt, const Plan& plan) {
    return finish(launch_window_attention_forward(p, dt, plan, nullptr), "forward launch");
  }
  bool backward(const BwdParams& p, DType dt, const Plan& plan) {
    return finish(launch_window_attention_backward(p, dt, plan, nullptr), "backward launch");
  }
  ~GpuRunner() {
    for (auto& kv : tables)
      if (kv.second) cudaFree(kv.second);
  }
};

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: test skipped\n");
    return 77;
  }
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  const int n_random = argc > 1 ? std::atoi(argv[1]) : 40;
  const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10)
                                 : static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  std::printf("window attention kernels on %s (sm_%d%d): seed %llu, %d random cases\n", prop.name, prop.major,
              prop.minor, static_cast<unsigned long long>(seed), n_random);
  std::mt19937_64 rng(seed);
  int failed = 0, total = 0;
  for (const auto& c : cos_test::standard_cases(rng, n_random, /*include_large=*/true)) {
    GpuRunner runner;
    const bool ok = cos_test::run_case(runner, c, rng, /*check_backward=*/true, /*check_determinism=*/true);
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", c.describe().c_str());
    failed += !ok;
    ++total;
  }
  std::printf("%d of %d cases passed (seed %llu)\n", total - failed, total, static_cast<unsigned long long>(seed));
  return failed ? 1 : 0;
}
