// Warp-level tensor-core primitives of the fp16/bf16 kernels (sm_80 and newer), no torch headers.
//
// On the GPU each is one PTX instruction; in host builds (the CPU emulation of ../tests/emulation.h,
// included first) each calls the emulation's model of that instruction, written from the fragment
// layouts of the PTX ISA ("Warp-level matrix fragment mma.m16n8k16", "ldmatrix", "cp.async").
//
// Fragments of mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, lane l of the warp,
// g = l / 4, t = l % 4; a 32-bit register packs two 16-bit elements, the lower-indexed one in the
// low half:
//   A (16 x 16, rows x k):  a[0] = (g, 2t..2t+1)    a[1] = (g+8, 2t..2t+1)
//                           a[2] = (g, 2t+8..2t+9)  a[3] = (g+8, 2t+8..2t+9)
//   B (16 x 8, k x cols):   b[0] = (2t..2t+1, g)    b[1] = (2t+8..2t+9, g)
//   C, D (16 x 8, fp32):    c[0], c[1] = (g, 2t), (g, 2t+1)    c[2], c[3] = (g+8, 2t), (g+8, 2t+1)
// So the C fragments of two neighbouring 8-column tiles, rounded to 16 bits, are an A fragment over
// those 16 columns (pack_a below): the scores of one product feed the next without shared memory.
//
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the addresses of rows 0..7
// of 8x8 matrix i (16 contiguous, 16-byte aligned bytes each); register i of lane l receives row g,
// elements 2t..2t+1 of matrix i, or with .trans its column g, elements 2t..2t+1 (rows 2t, 2t+1).
// Rows of keys (8 consecutive head dims each) therefore load as a B fragment of K^T directly and, with
// .trans, as a B fragment of V.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace cos_kernels {
namespace detail {

// Two floats rounded to the 16-bit type T and packed (x in the low half).
template <typename T>
COS_DEVICE uint32_t pack2(float x, float y);

template <>
COS_DEVICE uint32_t pack2<__half>(float x, float y) {
  return Elt<__half>::as_bits(__floats2half2_rn(x, y));
}

template <>
COS_DEVICE uint32_t pack2<__nv_bfloat16>(float x, float y) {
  return Elt<__nv_bfloat16>::as_bits(__floats2bfloat162_rn(x, y));
}

// The A fragment (16 rows x 16 columns) of the C fragments c0 (columns 0..7) and c1 (8..15).
template <typename T>
COS_DEVICE void pack_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// d += a * b, one m16n8k16 tensor-core product with fp32 accumulation (T: __half or __nv_bfloat16).
template <typename T>
COS_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(__CUDACC__)
  __trap();  // nvcc's host pass: device code only
#else
  ::cos_emu::mma_m16n8k16(d, a, b, std::is_same_v<T, __nv_bfloat16>);
#endif
}

#if defined(__CUDA_ARCH__)
COS_DEVICE uint32_t smem_address(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
#endif

// Four 8x8 matrices of 16-bit elements from shared memory; this lane gives `row`, the address of row
// (lane % 8) of matrix lane / 8. Trans: each lane receives a column pair instead of a row pair.
template <bool Trans>
COS_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__)
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(row)));
  }
#elif defined(__CUDACC__)
  __trap();
#else
  ::cos_emu::ldmatrix_x4(r, row, Trans);
#endif
}

// One asynchronous 16-byte copy global -> shared (both 16-byte aligned), in the current group.
COS_DEVICE void cp_async16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_address(dst)), "l"(src));
#elif defined(__CUDACC__)
  __trap();
#else
  ::cos_emu::cp_async16(dst, src);
#endif
}

// Closes the current group of this thread's asynchronous copies.
COS_DEVICE void cp_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::);
#elif !defined(__CUDACC__)
  ::cos_emu::cp_async_commit();
#endif
}

// Waits until at most N of this thread's committed groups are still in flight (then a barrier makes
// every thread's copies visible to the block).
template <int N>
COS_DEVICE void cp_async_wait() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");  // the copies' bytes are now shared memory
#elif !defined(__CUDACC__)
  ::cos_emu::cp_async_wait(N);
#endif
}

}  // namespace detail
}  // namespace cos_kernels
