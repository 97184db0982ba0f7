// Blockwise 4-bit (NF4 / FP4) decoding shared by dequantize_4bit.cu and gemv_4bit.cu.
//
// The format (README "The format"; rust/core/src/dequantize.rs and double_quant.rs are the reference):
//   element i        = nibble i of `packed`: the high half of byte i/2 for even i, the low half for odd i
//   block scale b    = absmax[b] (float32), or with double quantization
//                      (dynamic_map[absmax_codes[b]] * nested_absmax[b / 256]) + offset, each op rounded to f32
//   value i          = OUT(code[nibble i] * scale[i / blocksize]): one float32 product rounded once to OUT
// Block sizes are powers of two from 32 to 4096, passed as their log2.

// Index: quant_type (0 = nf4, 1 = fp4). The tables are the Rust core's, injected by the prelude.
__device__ const float qk_quant_codes[2][16] = {QLORAKIT_NF4_CODE, QLORAKIT_FP4_CODE};
__device__ const float qk_dynamic_map[256] = QLORAKIT_DYNAMIC_MAP;

// The float32 scale of block `block`, decoded from its nested code in the same pass when double-quantized.
// `absmax` points to uint8 codes (double_quant != 0) or float32 scales.
__device__ __forceinline__ float qk_block_scale(const void* __restrict__ absmax, const float* __restrict__ nested_absmax,
                                                float offset, int double_quant, long long block) {
    if (double_quant) {
        const unsigned char code = static_cast<const unsigned char*>(absmax)[block];
        const float nested = nested_absmax[block >> QLORAKIT_NESTED_BLOCKSIZE_LOG2];
        return qk_add_rn(qk_mul_rn(qk_dynamic_map[code], nested), offset);
    }
    return static_cast<const float*>(absmax)[block];
}

// The 16 codes of `quant_type` into shared memory (the caller synchronizes before reading): looked up with a
// per-element nibble, 16 distinct words in 16 distinct banks, so a warp's lookups never conflict.
__device__ __forceinline__ void qk_load_codes(float* codes, int quant_type) {
    for (unsigned int i = threadIdx.x; i < 16; i += blockDim.x) codes[i] = qk_quant_codes[quant_type][i];
}

// The nibble of element `e` (0..7) of a little-endian 32-bit word of packed codes: byte e/2, high half first.
__device__ __forceinline__ unsigned int qk_nibble(unsigned int word, int e) {
    return (word >> (8 * (e >> 1) + 4 * (1 - (e & 1)))) & 15u;
}

// Output element types: float32, or float16 / bfloat16 held as their 16-bit patterns.
struct qk_float32 {
    typedef float storage;
    static __device__ __forceinline__ float rounded(float v) { return v; }
    static __device__ __forceinline__ float to_float(float v) { return v; }
    static __device__ __forceinline__ float from_float(float v) { return v; }
};

struct qk_float16 {
    typedef unsigned short storage;
    static __device__ __forceinline__ float rounded(float v) { return qk_f16_to_f32(qk_f32_to_f16(v)); }
    static __device__ __forceinline__ float to_float(unsigned short v) { return qk_f16_to_f32(v); }
    static __device__ __forceinline__ unsigned short from_float(float v) { return qk_f32_to_f16(v); }
    static __device__ __forceinline__ unsigned int pack2(float lo, float hi) { return qk_pack_f16x2(lo, hi); }
    static __device__ __forceinline__ float low(unsigned int pair) { return qk_f16_to_f32(pair & 0xffffu); }
    static __device__ __forceinline__ float high(unsigned int pair) { return qk_f16_to_f32(pair >> 16); }
};

struct qk_bfloat16 {
    typedef unsigned short storage;
    static __device__ __forceinline__ float rounded(float v) { return qk_bf16_to_f32(qk_f32_to_bf16(v)); }
    static __device__ __forceinline__ float to_float(unsigned short v) { return qk_bf16_to_f32(v); }
    static __device__ __forceinline__ unsigned short from_float(float v) { return qk_f32_to_bf16(v); }
    static __device__ __forceinline__ unsigned int pack2(float lo, float hi) { return qk_pack_bf16x2(lo, hi); }
    static __device__ __forceinline__ float low(unsigned int pair) { return __uint_as_float(pair << 16); }
    static __device__ __forceinline__ float high(unsigned int pair) { return __uint_as_float(pair & 0xffff0000u); }
};

// Eight consecutive elements, 16-byte aligned: one 16-byte access for 16-bit types, two for float32.
__device__ __forceinline__ void qk_store8(qk_float32, float* out, const float v[8]) {
    float4* out4 = reinterpret_cast<float4*>(out);
    out4[0] = make_float4(v[0], v[1], v[2], v[3]);
    out4[1] = make_float4(v[4], v[5], v[6], v[7]);
}

template <class T>
__device__ __forceinline__ void qk_store8(T, unsigned short* out, const float v[8]) {
    *reinterpret_cast<uint4*>(out) =
        make_uint4(T::pack2(v[0], v[1]), T::pack2(v[2], v[3]), T::pack2(v[4], v[5]), T::pack2(v[6], v[7]));
}

__device__ __forceinline__ void qk_load8(qk_float32, const float* x, float v[8]) {
    const float4 a = reinterpret_cast<const float4*>(x)[0];
    const float4 b = reinterpret_cast<const float4*>(x)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

template <class T>
__device__ __forceinline__ void qk_load8(T, const unsigned short* x, float v[8]) {
    const uint4 q = *reinterpret_cast<const uint4*>(x);
    v[0] = T::low(q.x), v[1] = T::high(q.x), v[2] = T::low(q.y), v[3] = T::high(q.y);
    v[4] = T::low(q.z), v[5] = T::high(q.z), v[6] = T::low(q.w), v[7] = T::high(q.w);
}
