// Maps a runtime (dtype, threads-per-row) pair to the kernel template arguments (T, G).
// Shared by the CUDA launchers and the CPU emulation test, so both run the same instantiations.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <type_traits>

#include "window_attention.h"

namespace cos_kernels {
namespace detail {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}, std::integral_constant<int, G>{}) for dt in {fp32, fp16, bf16}, G in {1, 2, 4, 8};
// cudaErrorInvalidValue for anything else.
template <typename F>
cudaError_t dispatch_kernel(DType dt, int group, F&& f) {
  auto by_group = [&](auto type_tag) -> cudaError_t {
    switch (group) {
      case 1: return f(type_tag, std::integral_constant<int, 1>{});
      case 2: return f(type_tag, std::integral_constant<int, 2>{});
      case 4: return f(type_tag, std::integral_constant<int, 4>{});
      case 8: return f(type_tag, std::integral_constant<int, 8>{});
      default: return cudaErrorInvalidValue;
    }
  };
  switch (dt) {
    case DType::kFloat32: return by_group(TypeTag<float>{});
    case DType::kFloat16: return by_group(TypeTag<__half>{});
    case DType::kBFloat16: return by_group(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// Blocks of a launch over `tiles` tiles for every (batch, head); 0 when there is nothing to do.
inline unsigned num_blocks(int tiles, int batch, int heads) {
  return static_cast<unsigned>(static_cast<int64_t>(tiles) * batch * heads);
}

}  // namespace detail
}  // namespace cos_kernels
