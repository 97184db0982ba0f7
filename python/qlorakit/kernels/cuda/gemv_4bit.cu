// Batch-1 (decode-time) fused dequantize-and-multiply: y = W x (+ bias) for a 4-bit W [rows, cols] and one
// input row x [cols], without materializing W. Linear4bit uses it when its input has a single row.
//
// Each weight is decoded exactly as dequantize_4bit.cu decodes it and rounded to the compute type T (what the
// dequantize-then-matmul path multiplies with), multiplied by x in float32 and accumulated with fmaf in
// float32; y is rounded to T once. Only the summation order differs from a dense matmul.
//
// Work split: one warp per output row (GEMV_WARPS rows per block). When cols is a multiple of 32 and the
// pointers are 16-byte aligned (`vectorized`, decided by the caller), lane l reads 32-element chunks
// l, l + 32, ... of the row: 16 bytes of codes per load (a coalesced 512 bytes per warp) and 32 elements of x
// in 16-byte vectors; a chunk starts at a multiple of 32, so it lies in one quantization block (one scale).
// Otherwise (odd shapes, rows that start mid-byte) lane l takes elements l, l + 32, ... one at a time. Lane
// sums are combined by a butterfly of __shfl_xor_sync, so every lane ends with the same total.
//
// Launch: block (32 * GEMV_WARPS), grid (ceil(rows / GEMV_WARPS)).

#include "blockwise_4bit.cuh"

#define GEMV_WARPS 4

template <class T>
__device__ __forceinline__ float qk_dot_word(unsigned int word, float scale, const float* codes,
                                             const typename T::storage* x, float acc) {
    float xs[8];
    qk_load8(T(), x, xs);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc = fmaf(T::rounded(qk_mul_rn(codes[qk_nibble(word, e)], scale)), xs[e], acc);
    return acc;
}

template <class T>
__device__ __forceinline__ void gemv_4bit(const unsigned char* __restrict__ packed, const void* __restrict__ absmax,
                                          const float* __restrict__ nested_absmax, float offset, int double_quant,
                                          int quant_type, const typename T::storage* __restrict__ x,
                                          const typename T::storage* __restrict__ bias,
                                          typename T::storage* __restrict__ out, int rows, int cols,
                                          int blocksize_log2, int vectorized) {
    __shared__ float codes[16];
    qk_load_codes(codes, quant_type);
    __syncthreads();

    const int lane = threadIdx.x & 31;
    const long long row = static_cast<long long>(blockIdx.x) * GEMV_WARPS + (threadIdx.x >> 5);
    if (row >= rows) return;  // the whole warp: no lane is left waiting in the shuffles below
    const long long row_start = row * cols;

    float acc = 0.0f;
    if (vectorized) {
        const uint4* row_codes = reinterpret_cast<const uint4*>(packed + (row_start >> 1));
        const int chunks = cols >> 5;
        for (int c = lane; c < chunks; c += 32) {
            const uint4 q = row_codes[c];
            const long long first = row_start + 32LL * c;
            const float scale = qk_block_scale(absmax, nested_absmax, offset, double_quant, first >> blocksize_log2);
            const typename T::storage* xc = x + 32LL * c;
            acc = qk_dot_word<T>(q.x, scale, codes, xc, acc);
            acc = qk_dot_word<T>(q.y, scale, codes, xc + 8, acc);
            acc = qk_dot_word<T>(q.z, scale, codes, xc + 16, acc);
            acc = qk_dot_word<T>(q.w, scale, codes, xc + 24, acc);
        }
    } else {
        for (int k = lane; k < cols; k += 32) {
            const long long i = row_start + k;
            const unsigned int byte = packed[i >> 1];
            const unsigned int nibble = (i & 1) ? (byte & 15u) : (byte >> 4);
            const float scale = qk_block_scale(absmax, nested_absmax, offset, double_quant, i >> blocksize_log2);
            acc = fmaf(T::rounded(qk_mul_rn(codes[nibble], scale)), T::to_float(x[k]), acc);
        }
    }
#pragma unroll
    for (int delta = 16; delta > 0; delta >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, delta);
    if (lane == 0) {
        if (bias != nullptr) acc += T::to_float(bias[row]);
        out[row] = T::from_float(acc);
    }
}

#define QK_GEMV_ARGS                                                                                        \
    const unsigned char *__restrict__ packed, const void *__restrict__ absmax,                              \
        const float *__restrict__ nested_absmax, float offset, int double_quant, int quant_type
#define QK_GEMV_SHAPE int rows, int cols, int blocksize_log2, int vectorized
#define QK_GEMV_PASS packed, absmax, nested_absmax, offset, double_quant, quant_type, x, bias, out, rows, cols, \
                     blocksize_log2, vectorized

extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)
gemv_4bit_f32(QK_GEMV_ARGS, const float* __restrict__ x, const float* __restrict__ bias, float* __restrict__ out,
              QK_GEMV_SHAPE) {
    gemv_4bit<qk_float32>(QK_GEMV_PASS);
}

extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)
gemv_4bit_f16(QK_GEMV_ARGS, const unsigned short* __restrict__ x, const unsigned short* __restrict__ bias,
              unsigned short* __restrict__ out, QK_GEMV_SHAPE) {
    gemv_4bit<qk_float16>(QK_GEMV_PASS);
}

extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)
gemv_4bit_bf16(QK_GEMV_ARGS, const unsigned short* __restrict__ x, const unsigned short* __restrict__ bias,
               unsigned short* __restrict__ out, QK_GEMV_SHAPE) {
    gemv_4bit<qk_bfloat16>(QK_GEMV_PASS);
}
