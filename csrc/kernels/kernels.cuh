// The kernel of each step for an element type T and head-dim group G: the one place that chooses
// between the CUDA-core kernels (fp32: forward.cuh, backward.cuh) and the tensor-core kernels
// (fp16 / bf16: tc_forward.cuh, tc_backward.cuh). Used by the launchers and the CPU emulation test.
#pragma once

#include <type_traits>

#include "backward.cuh"
#include "forward.cuh"
#include "tc_backward.cuh"
#include "tc_forward.cuh"

namespace cos_kernels {
namespace detail {

template <typename T>
constexpr bool kUsesTensorCores = !std::is_same_v<T, float>;

template <typename T, int G>
constexpr auto forward_kernel() {
  if constexpr (kUsesTensorCores<T>) return &tc_forward_kernel<T, G>;
  else return &window_attention_forward_kernel<T, G>;
}

template <typename T, int G>
constexpr auto dq_kernel() {
  if constexpr (kUsesTensorCores<T>) return &tc_dq_kernel<T, G>;
  else return &window_attention_dq_kernel<T, G>;
}

template <typename T, int G>
constexpr auto dkv_kernel() {
  if constexpr (kUsesTensorCores<T>) return &tc_dkv_kernel<T, G>;
  else return &window_attention_dkv_kernel<T, G>;
}

}  // namespace detail
}  // namespace cos_kernels
