// Torch binding of the CUDA kernels: the ops cos_kernels_cuda::window_attention_forward / _backward
// (schemas = the Python custom ops cos_kernels::window_attention_* minus the backend string), with
// CUDA implementations and CPU implementations that refuse with a clear message; plus the pybind11
// module cos_kernels._C that loads them. Their fake (meta) kernels, which must handle symbolic shapes,
// are registered in Python (cos_kernels/ops/cuda_backend.py); autograd and torch.compile support live
// once for every backend in cos_kernels/ops/custom_op.py.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/window_attention.h"

namespace {

using cos_kernels::DType;
using cos_kernels::LayoutSpec;
using cos_kernels::Plan;

// Test hook: fill every output with NaN before the kernels run, so an element no thread writes shows.
std::atomic<bool> g_poison_outputs{false};

void poison(std::initializer_list<at::Tensor*> tensors) {
  if (!g_poison_outputs.load()) return;
  for (at::Tensor* t : tensors) t->fill_(std::numeric_limits<double>::quiet_NaN());
}

constexpr const char* kForward = "cos_kernels_cuda::window_attention_forward";
constexpr const char* kBackward = "cos_kernels_cuda::window_attention_backward";

std::string shape_str(at::IntArrayRef s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + (s.size() == 1 ? ",)" : ")");
}

LayoutSpec parse_spec(const char* op, at::IntArrayRef spec) {
  LayoutSpec L;
  const std::string err = cos_kernels::parse_layout_spec(spec.data(), spec.size(), &L);
  TORCH_CHECK(err.empty(), op, ": ", err);
  return L;
}

DType dtype_of(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  return DType::kFloat32;  // unreachable
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q, bool need_cuda) {
  if (need_cuda)
    TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device(),
                " (the cuda backend runs on CUDA tensors only)");
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ",
              t.device());
}

void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(), ", got ",
              t.scalar_type());
}

// q (B, Q, H, D), k and v (B, S, N, H, D) consistent with the layout; D in 16..128.
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const LayoutSpec& L,
               bool need_cuda) {
  check_device(op, "q", q, q, need_cuda);
  check_device(op, "k", k, q, need_cuda);
  check_device(op, "v", v, q, need_cuda);
  dtype_of(op, "q", q);
  check_same_dtype(op, "k", k, q);
  check_same_dtype(op, "v", v, q);
  TORCH_CHECK(q.dim() == 4, op, ": q must have shape (B, Q, H, D), got ", shape_str(q.sizes()));
  const int64_t B = q.size(0), Q = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(Q == L.total_queries(), op, ": q has ", Q, " queries (shape ", shape_str(q.sizes()),
              ") but the layout has ", L.total_queries());
  TORCH_CHECK(D >= cos_kernels::kMinHeadDim && D <= cos_kernels::kMaxHeadDim, op, ": head dim D must be in ",
              cos_kernels::kMinHeadDim, "..", cos_kernels::kMaxHeadDim, ", got D = ", D, " (q of shape ",
              shape_str(q.sizes()), ")");
  const std::vector<int64_t> want = {B, L.num_scales(), L.num_patches(), H, D};
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}})
    TORCH_CHECK(t.sizes() == at::IntArrayRef(want), op, ": ", name, " must have shape (B, S, N, H, D) = ",
                shape_str(want), " for q of shape ", shape_str(q.sizes()), " and this layout, got ",
                shape_str(t.sizes()));
}

// ---- plans, cached per (device, head dim, dtype, layout) with their tile table on the device -------
struct PlanEntry {
  Plan plan;
  at::Tensor tiles;  // int32, q-tiles then k-tiles, on the device
};

const PlanEntry& plan_for(const LayoutSpec& L, at::IntArrayRef spec, int head_dim, DType dt,
                          const at::Device& device) {
  using Key = std::tuple<int, int, int, std::vector<int64_t>>;
  static std::mutex mutex;
  static std::map<Key, std::unique_ptr<PlanEntry>> cache;
  Key key{device.index(), head_dim, static_cast<int>(dt), spec.vec()};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) {
    auto entry = std::make_unique<PlanEntry>();
    entry->plan = cos_kernels::make_plan(L, head_dim, dt);
    const auto& t = entry->plan.tiles;
    entry->tiles = at::from_blob(const_cast<int32_t*>(t.data()), {static_cast<int64_t>(t.size())},
                                 at::TensorOptions().dtype(at::kInt))
                       .to(device);
    it = cache.emplace(std::move(key), std::move(entry)).first;
  }
  return *it->second;  // entries are never erased: the reference stays valid
}

template <size_t N>
void copy_strides(int64_t (&dst)[N], const at::Tensor& t) {
  for (size_t i = 0; i < N; ++i) dst[i] = t.stride(static_cast<int64_t>(i));
}

bool vec4(const at::Tensor& t, int head_dim) {
  return cos_kernels::can_vec4(t.data_ptr(), t.strides().data(), static_cast<int>(t.dim()), head_dim,
                               t.element_size());
}

bool copy16(const at::Tensor& t, int head_dim) {
  return cos_kernels::can_copy16(t.data_ptr(), t.strides().data(), static_cast<int>(t.dim()), head_dim,
                                 t.element_size());
}

void check_grid(const char* op, const Plan& plan, int64_t B, int64_t H) {
  TORCH_CHECK(cos_kernels::grid_fits(std::max(plan.q.num_tiles, plan.k.num_tiles), B, H), op,
              ": too many thread blocks for one launch (", std::max(plan.q.num_tiles, plan.k.num_tiles), " tiles x B=",
              B, " x H=", H, " >= 2^31); split the batch");
}

// ---- forward ---------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                at::IntArrayRef layout_spec, double softmax_scale) {
  const LayoutSpec L = parse_spec(kForward, layout_spec);
  check_qkv(kForward, q, k, v, L, /*need_cuda=*/true);
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, kForward,
              ": softmax_scale must be a positive finite number, got ", softmax_scale);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), Q = q.size(1), H = q.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, Q, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, Q}, q.options().dtype(at::kFloat));
  if (B == 0 || H == 0) return {out, lse};
  const DType dt = dtype_of(kForward, "q", q);
  const PlanEntry& entry = plan_for(L, layout_spec, static_cast<int>(D), dt, q.device());
  check_grid(kForward, entry.plan, B, H);
  poison({&out, &lse});

  cos_kernels::FwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  copy_strides(p.q_stride, q);
  copy_strides(p.k_stride, k);
  copy_strides(p.v_stride, v);
  p.tiles = entry.tiles.data_ptr<int32_t>();
  p.num_tiles = entry.plan.q.num_tiles;
  p.batch = static_cast<int>(B);
  p.heads = static_cast<int>(H);
  p.head_dim = static_cast<int>(D);
  p.total_queries = static_cast<int>(Q);
  p.grid_w = L.grid_w;
  p.col_slots = entry.plan.q.col_slots;
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.q_vec = vec4(q, p.head_dim);
  p.kv_vec = vec4(k, p.head_dim) && vec4(v, p.head_dim);
  p.out_vec = vec4(out, p.head_dim);
  p.kv_async = copy16(k, p.head_dim) && copy16(v, p.head_dim);
  const cudaError_t err =
      cos_kernels::launch_window_attention_forward(p, dt, entry.plan, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, kForward, ": kernel launch failed: ", cudaGetErrorString(err));
  return {out, lse};
}

// ---- backward --------------------------------------------------------------------------------------
void check_backward_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& out, const at::Tensor& lse, const LayoutSpec& L, bool need_cuda) {
  check_qkv(kBackward, q, k, v, L, need_cuda);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_out", grad_out}, {"out", out}}) {
    check_device(kBackward, name, t, q, need_cuda);
    check_same_dtype(kBackward, name, t, q);
    TORCH_CHECK(t.sizes() == q.sizes(), kBackward, ": ", name, " must have q's shape ", shape_str(q.sizes()),
                ", got ", shape_str(t.sizes()));
  }
  check_device(kBackward, "lse", lse, q, need_cuda);
  const std::vector<int64_t> want = {q.size(0), q.size(2), q.size(1)};
  TORCH_CHECK(lse.scalar_type() == at::kFloat, kBackward, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(want), kBackward, ": lse must have shape (B, H, Q) = ", shape_str(want),
              ", got ", shape_str(lse.sizes()));
  TORCH_CHECK(lse.is_contiguous(), kBackward, ": lse must be contiguous (as the forward returns it)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             at::IntArrayRef layout_spec, double softmax_scale) {
  const LayoutSpec L = parse_spec(kBackward, layout_spec);
  check_backward_args(grad_out, q, k, v, out, lse, L, /*need_cuda=*/true);
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, kBackward,
              ": softmax_scale must be a positive finite number, got ", softmax_scale);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), Q = q.size(1), H = q.size(2), D = q.size(3);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (B == 0 || H == 0) return {dq, dk, dv};
  at::Tensor delta = at::empty({B, H, Q}, q.options().dtype(at::kFloat));
  const DType dt = dtype_of(kBackward, "q", q);
  const PlanEntry& entry = plan_for(L, layout_spec, static_cast<int>(D), dt, q.device());
  check_grid(kBackward, entry.plan, B, H);
  poison({&dq, &dk, &dv, &delta});

  cos_kernels::BwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.grad_out = grad_out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  copy_strides(p.q_stride, q);
  copy_strides(p.o_stride, out);
  copy_strides(p.do_stride, grad_out);
  copy_strides(p.k_stride, k);
  copy_strides(p.v_stride, v);
  p.q_tiles = entry.tiles.data_ptr<int32_t>();
  p.k_tiles = p.q_tiles + entry.plan.k_tile_offset();
  p.num_q_tiles = entry.plan.q.num_tiles;
  p.num_k_tiles = entry.plan.k.num_tiles;
  p.batch = static_cast<int>(B);
  p.heads = static_cast<int>(H);
  p.head_dim = static_cast<int>(D);
  p.total_queries = static_cast<int>(Q);
  p.num_scales = L.num_scales();
  p.num_patches = L.num_patches();
  p.grid_w = L.grid_w;
  p.q_col_slots = entry.plan.q.col_slots;
  p.k_col_slots = entry.plan.k.col_slots;
  p.scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.q_vec = vec4(q, p.head_dim);
  p.kv_vec = vec4(k, p.head_dim) && vec4(v, p.head_dim);
  p.o_vec = vec4(out, p.head_dim);
  p.do_vec = vec4(grad_out, p.head_dim);
  p.dq_vec = vec4(dq, p.head_dim);
  p.dkv_vec = vec4(dk, p.head_dim) && vec4(dv, p.head_dim);
  p.kv_async = copy16(k, p.head_dim) && copy16(v, p.head_dim);
  p.q_async = copy16(q, p.head_dim);
  p.do_async = copy16(grad_out, p.head_dim);
  const cudaError_t err =
      cos_kernels::launch_window_attention_backward(p, dt, entry.plan, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, kBackward, ": kernel launch failed: ", cudaGetErrorString(err));
  return {dq, dk, dv};
}

// CPU tensors: the same validation, which names the device problem first.
std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               at::IntArrayRef layout_spec, double softmax_scale) {
  return forward_cuda(q, k, v, layout_spec, softmax_scale);  // fails in check_qkv: not CUDA
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& out, const at::Tensor& lse,
                                                            at::IntArrayRef layout_spec, double softmax_scale) {
  return backward_cuda(grad_out, q, k, v, out, lse, layout_spec, softmax_scale);  // fails: not CUDA
}

}  // namespace

TORCH_LIBRARY(cos_kernels_cuda, m) {
  m.def(
      "window_attention_forward(Tensor q, Tensor k, Tensor v, int[] layout_spec, float softmax_scale) "
      "-> (Tensor, Tensor)");
  m.def(
      "window_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "int[] layout_spec, float softmax_scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cos_kernels_cuda, CUDA, m) {
  m.impl("window_attention_forward", &forward_cuda);
  m.impl("window_attention_backward", &backward_cuda);
}

TORCH_LIBRARY_IMPL(cos_kernels_cuda, CPU, m) {
  m.impl("window_attention_forward", &forward_cpu);
  m.impl("window_attention_backward", &backward_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "cos_kernels CUDA extension: loading it registers torch.ops.cos_kernels_cuda.window_attention_forward "
      "and window_attention_backward.";
  m.def(
      "set_poison_outputs", [](bool on) { g_poison_outputs.store(on); }, pybind11::arg("on"),
      "Test hook: when on, every output (and scratch) buffer is filled with NaN before the kernels run.");
  m.def(
      "plan_summary",
      [](std::vector<int64_t> layout_spec, int64_t head_dim, const std::string& dtype) {
        const LayoutSpec L = parse_spec("cos_kernels._C.plan_summary", layout_spec);
        TORCH_CHECK(head_dim >= cos_kernels::kMinHeadDim && head_dim <= cos_kernels::kMaxHeadDim,
                    "cos_kernels._C.plan_summary: head_dim must be in 16..128, got ", head_dim);
        DType dt = DType::kFloat32;
        if (dtype == "float16") dt = DType::kFloat16;
        else if (dtype == "bfloat16") dt = DType::kBFloat16;
        else TORCH_CHECK(dtype == "float32", "cos_kernels._C.plan_summary: dtype must be 'float32', 'float16' or "
                         "'bfloat16', got '", dtype, "'");
        const Plan plan = cos_kernels::make_plan(L, static_cast<int>(head_dim), dt);
        pybind11::dict d;
        d["tensor_cores"] = plan.tensor_cores;
        d["threads_per_row"] = plan.group;
        d["padded_head_dim"] = plan.padded_dim;
        d["q_tiles"] = plan.q.num_tiles;
        d["q_rows_per_block"] = plan.q.rows;
        d["q_threads"] = plan.q.threads;
        d["q_smem_bytes"] = plan.q.smem_bytes;
        d["k_tiles"] = plan.k.num_tiles;
        d["k_rows_per_block"] = plan.k.rows;
        d["k_threads"] = plan.k.threads;
        d["k_smem_bytes"] = plan.k.smem_bytes;
        return d;
      },
      pybind11::arg("layout_spec"), pybind11::arg("head_dim"), pybind11::arg("dtype") = "float32",
      "Launch configuration the kernels use for a layout spec, head dim and dtype (fp32: CUDA cores; fp16 / "
      "bf16: tensor cores), for benchmarks and debugging.");
}
