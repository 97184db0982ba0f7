// qlorakit device helpers: part of the prelude qlorakit.kernels.sources puts in front of every kernel file.
//
// Kernels include no CUDA toolkit header: the NVRTC of the pip wheels has no built-in cuda_fp16.h or
// cuda_bf16.h and a CuPy install need not ship them. What the kernels need of them is here, written against
// PTX, and cuda/emulation/cuda_shim.h defines the same names for the host compiler (the CPU emulation), which
// sets QLORAKIT_HOST_EMULATION before this text.
//
//   qk_mul_rn, qk_add_rn        float32 multiply / add rounded to nearest-even, never fused and never flushed
//                               to zero: CuPy appends -ftz=true to every compile (which also turns __fmul_rn
//                               into mul.rn.ftz), and the decoders must round like the Rust core
//   qk_f32_to_bf16/f16          float32 -> 16-bit bits, round to nearest-even (subnormals kept, overflow -> inf)
//   qk_pack_bf16x2/f16x2        two floats -> one 32-bit word, the first (lo) in the low half: memory order
//   qk_bf16_to_f32/f16_to_f32   16-bit bits -> float32 (exact)
//   __half, __nv_bfloat16       minimal 16-bit storage types with CUDA's scalar conversion functions
//                               (__float2half_rn, __half2float, __float2bfloat16_rn, __bfloat162float, ...)

#ifndef QLORAKIT_HOST_EMULATION

__device__ __forceinline__ float qk_mul_rn(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float qk_add_rn(float a, float b) {
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ unsigned short qk_f32_to_bf16(float x) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ unsigned short qk_f32_to_f16(float x) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

// cvt.rn.{bf16,f16}x2.f32 d, a, b puts a in the upper half of d and b in the lower half.
__device__ __forceinline__ unsigned int qk_pack_bf16x2(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ unsigned int qk_pack_f16x2(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float qk_f16_to_f32(unsigned short h) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
    return r;
}

#endif  // QLORAKIT_HOST_EMULATION

// bf16 is the upper half of a float32: widening is a shift on every platform.
__device__ __forceinline__ float qk_bf16_to_f32(unsigned short b) {
    return __uint_as_float(static_cast<unsigned int>(b) << 16);
}

struct alignas(2) __half {
    unsigned short __x;
};

struct alignas(2) __nv_bfloat16 {
    unsigned short __x;
};

__device__ __forceinline__ __half __ushort_as_half(unsigned short bits) {
    __half h;
    h.__x = bits;
    return h;
}

__device__ __forceinline__ __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) {
    __nv_bfloat16 b;
    b.__x = bits;
    return b;
}

__device__ __forceinline__ unsigned short __half_as_ushort(__half h) { return h.__x; }
__device__ __forceinline__ unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
__device__ __forceinline__ __half __float2half_rn(float x) { return __ushort_as_half(qk_f32_to_f16(x)); }
__device__ __forceinline__ __half __float2half(float x) { return __float2half_rn(x); }
__device__ __forceinline__ float __half2float(__half h) { return qk_f16_to_f32(h.__x); }
__device__ __forceinline__ __nv_bfloat16 __float2bfloat16_rn(float x) { return __ushort_as_bfloat16(qk_f32_to_bf16(x)); }
__device__ __forceinline__ __nv_bfloat16 __float2bfloat16(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ float __bfloat162float(__nv_bfloat16 b) { return qk_bf16_to_f32(b.__x); }
