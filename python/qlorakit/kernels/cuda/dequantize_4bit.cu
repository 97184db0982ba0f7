// Blockwise 4-bit dequantization (NF4 / FP4) to float32, float16 or bfloat16, with double-quantized block
// scales decoded in the same pass (no separate absmax launch). Bit-identical to the Rust core's
// dequantize_4bit + dequantize_absmax and to bitsandbytes' dequantize_4bit (see blockwise_4bit.cuh).
//
// Work split. A group is 8 elements: one 32-bit word of packed codes. Every block size is a multiple of 8, so
// a group lies in one quantization block and needs one scale. Each thread handles GROUPS_PER_THREAD groups
// strided by the block width: per warp and group that is one coalesced 128-byte load of codes and one
// coalesced 512-byte (16-bit output) or 1 KiB (float32) store of 16-byte vectors, and every thread issues all
// its loads before its first store, so enough bytes are in flight to run at memory bandwidth. The last group
// of an element count that is not a multiple of 8 is decoded element by element from single bytes (nothing
// past the (n + 1) / 2 packed bytes or the n outputs is touched).
//
// Alignment (checked by the caller): packed 4 bytes, out 16 bytes.
//
// Launch: block (DEQUANT_THREADS), grid (ceil(ceil(n / 8) / (DEQUANT_THREADS * GROUPS_PER_THREAD))).

#include "blockwise_4bit.cuh"

#define DEQUANT_THREADS 256
#define GROUPS_PER_THREAD 4

template <class T>
__device__ __forceinline__ void dequantize_4bit(const unsigned char* __restrict__ packed,
                                                const void* __restrict__ absmax,
                                                const float* __restrict__ nested_absmax, float offset,
                                                int double_quant, int quant_type,
                                                typename T::storage* __restrict__ out, long long n,
                                                int blocksize_log2) {
    __shared__ float codes[16];
    qk_load_codes(codes, quant_type);
    __syncthreads();

    const long long full_groups = n >> 3;
    const long long first = static_cast<long long>(blockIdx.x) * (DEQUANT_THREADS * GROUPS_PER_THREAD) + threadIdx.x;
    const unsigned int* words = reinterpret_cast<const unsigned int*>(packed);

    unsigned int word[GROUPS_PER_THREAD];
    float scale[GROUPS_PER_THREAD];
#pragma unroll
    for (int k = 0; k < GROUPS_PER_THREAD; ++k) {
        const long long group = first + k * DEQUANT_THREADS;
        word[k] = 0;
        scale[k] = 0.0f;
        if (group < full_groups) {
            word[k] = words[group];
            scale[k] = qk_block_scale(absmax, nested_absmax, offset, double_quant, (group << 3) >> blocksize_log2);
        }
    }
#pragma unroll
    for (int k = 0; k < GROUPS_PER_THREAD; ++k) {
        const long long group = first + k * DEQUANT_THREADS;
        if (group < full_groups) {
            float values[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) values[e] = qk_mul_rn(codes[qk_nibble(word[k], e)], scale[k]);
            qk_store8(T(), out + (group << 3), values);
        } else if (group == full_groups && (n & 7) != 0) {
            const long long start = group << 3;
            const float tail_scale = qk_block_scale(absmax, nested_absmax, offset, double_quant, start >> blocksize_log2);
            for (long long i = start; i < n; ++i) {
                const unsigned int byte = packed[i >> 1];
                const unsigned int nibble = (i & 1) ? (byte & 15u) : (byte >> 4);
                out[i] = T::from_float(qk_mul_rn(codes[nibble], tail_scale));
            }
        }
    }
}

#define QK_DEQUANTIZE_ARGS                                                                                  \
    const unsigned char *__restrict__ packed, const void *__restrict__ absmax,                              \
        const float *__restrict__ nested_absmax, float offset, int double_quant, int quant_type
#define QK_DEQUANTIZE_PASS packed, absmax, nested_absmax, offset, double_quant, quant_type

extern "C" __global__ void __launch_bounds__(DEQUANT_THREADS)
dequantize_4bit_f32(QK_DEQUANTIZE_ARGS, float* __restrict__ out, long long n, int blocksize_log2) {
    dequantize_4bit<qk_float32>(QK_DEQUANTIZE_PASS, out, n, blocksize_log2);
}

extern "C" __global__ void __launch_bounds__(DEQUANT_THREADS)
dequantize_4bit_f16(QK_DEQUANTIZE_ARGS, unsigned short* __restrict__ out, long long n, int blocksize_log2) {
    dequantize_4bit<qk_float16>(QK_DEQUANTIZE_PASS, out, n, blocksize_log2);
}

extern "C" __global__ void __launch_bounds__(DEQUANT_THREADS)
dequantize_4bit_bf16(QK_DEQUANTIZE_ARGS, unsigned short* __restrict__ out, long long n, int blocksize_log2) {
    dequantize_4bit<qk_bfloat16>(QK_DEQUANTIZE_PASS, out, n, blocksize_log2);
}
