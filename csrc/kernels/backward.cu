// Host launcher of the backward kernels (kernels.cuh: CUDA cores for fp32, tensor cores for fp16 /
// bf16): dQ (which also writes delta), then dK/dV, on one stream; instantiated for fp32, fp16, bf16 x
// G in {1,2,4,8}.
#include "dispatch.h"
#include "kernels.cuh"

namespace cos_kernels {

cudaError_t launch_window_attention_backward(const BwdParams& p, DType dt, const Plan& plan, cudaStream_t stream) {
  if (!grid_fits(plan.q.num_tiles, p.batch, p.heads) || !grid_fits(plan.k.num_tiles, p.batch, p.heads))
    return cudaErrorInvalidConfiguration;
  const unsigned q_blocks = detail::num_blocks(plan.q.num_tiles, p.batch, p.heads);
  const unsigned k_blocks = detail::num_blocks(plan.k.num_tiles, p.batch, p.heads);
  if (q_blocks == 0 || k_blocks == 0) return cudaSuccess;
  if (plan.q.smem_bytes > 48 * 1024 || plan.k.smem_bytes > 48 * 1024 || p.q_col_slots != plan.q.col_slots ||
      p.k_col_slots != plan.k.col_slots)
    return cudaErrorInvalidValue;
  return detail::dispatch_kernel(dt, plan.group, [&](auto type_tag, auto group) -> cudaError_t {
    using T = typename decltype(type_tag)::type;
    constexpr int G = decltype(group)::value;
    if (plan.tensor_cores != detail::kUsesTensorCores<T>) return cudaErrorInvalidValue;  // a plan of another dtype
    detail::dq_kernel<T, G>()<<<q_blocks, plan.q.threads, plan.q.smem_bytes, stream>>>(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    detail::dkv_kernel<T, G>()<<<k_blocks, plan.k.threads, plan.k.smem_bytes, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace cos_kernels
