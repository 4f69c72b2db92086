// Host launcher of the forward kernel (kernels.cuh: CUDA cores for fp32, tensor cores for fp16 / bf16),
// instantiated for fp32, fp16, bf16 x G in {1,2,4,8}.
#include "dispatch.h"
#include "kernels.cuh"

namespace cos_kernels {

cudaError_t launch_window_attention_forward(const FwdParams& p, DType dt, const Plan& plan, cudaStream_t stream) {
  if (!grid_fits(plan.q.num_tiles, p.batch, p.heads)) return cudaErrorInvalidConfiguration;
  const unsigned blocks = detail::num_blocks(plan.q.num_tiles, p.batch, p.heads);
  if (blocks == 0) return cudaSuccess;
  if (plan.q.smem_bytes > 48 * 1024 || p.col_slots != plan.q.col_slots) return cudaErrorInvalidValue;
  return detail::dispatch_kernel(dt, plan.group, [&](auto type_tag, auto group) -> cudaError_t {
    using T = typename decltype(type_tag)::type;
    constexpr int G = decltype(group)::value;
    if (plan.tensor_cores != detail::kUsesTensorCores<T>) return cudaErrorInvalidValue;  // a plan of another dtype
    detail::forward_kernel<T, G>()<<<blocks, plan.q.threads, plan.q.smem_bytes, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace cos_kernels
