// One fused Adam / AdamW update of one parameter (qlorakit.optim.PagedAdam / PagedAdamW).
//
// The moments are float32 (they live in CUDA managed memory, but the kernel does not care:
// managed pointers are ordinary device pointers here). The parameter and its gradient are
// QK_PARAM_T: float, or bf16 / fp16 for mixed-precision adapters, computed in float32 and
// rounded back to the parameter's type once per step.
//
// qlorakit: variant QK_PARAM_T=float
// qlorakit: variant QK_PARAM_T=__nv_bfloat16
// qlorakit: variant QK_PARAM_T=__half
//
// The arithmetic repeats torch.optim.Adam's `_single_tensor_adam` (torch 2.x, no amsgrad,
// not capturable) operation by operation, each with its own IEEE round-to-nearest:
//
//   Adam:   g = g + wd * p                  grad.add(param, alpha=wd)
//   AdamW:  p = p * (1 - lr * wd)           param.mul_(1 - lr * wd)
//           m = lerp(m, g, 1 - beta1)       exp_avg.lerp_(grad, 1 - beta1)
//           v = v * beta2 + (1-beta2)*g*g   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//           d = sqrt(v) / sqrt(bc2) + eps   (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
//           p = p + (-lr / bc1) * m / d     param.addcdiv_(exp_avg, denom, value=-step_size)
//
// Each operation rounds once, to nearest-even, with subnormals kept: multiply and add are the
// prelude's qk_mul_rn / qk_add_rn; subtract, fused multiply-add, division and square root are
// the qk_*_rn helpers below. All are explicit PTX, because CuPy compiles with -ftz=true (which
// turns __fmul_rn, __fdiv_rn, ... into their flush-to-zero forms) and a plain expression may
// be contracted. Where torch's vectorized CPU kernels fuse a multiply-add (add with alpha, lerp,
// addcmul: measured on torch 2.15's AVX2 and AVX-512 kernels) this kernel does too, so it
// computes the formula above exactly as those kernels do; the CPU path (torch's own ops,
// python/qlorakit/optim/update.py) then differs only where torch's float32 sqrt is not
// correctly rounded (MKL's on x86 builds: one ulp in some denominators, ~1e-7 relative in the
// update). tests/test_optim.py holds the CPU emulation of this source to a numpy spelling of
// the formula, bit for bit, and to the CPU path within 1e-6.
//
// The host computes the step's scalars in double precision exactly as torch does and passes
// them rounded to float, as torch rounds a Python scalar for a float32 tensor op.

#ifndef QLORAKIT_HOST_EMULATION

__device__ __forceinline__ float qk_fma_rn(float a, float b, float c) {
    float r;
    asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
    return r;
}

__device__ __forceinline__ float qk_sub_rn(float a, float b) {
    float r;  // not qk_add_rn(a, -b): under -ftz=true the negation itself would flush a subnormal b
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float qk_div_rn(float a, float b) {
    float r;
    asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float qk_sqrt_rn(float a) {
    float r;
    asm("sqrt.rn.f32 %0, %1;" : "=f"(r) : "f"(a));
    return r;
}

#else  // the CPU emulation: host IEEE arithmetic, no contraction, no flush to zero

inline float qk_fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
inline float qk_sub_rn(float a, float b) { return __fsub_rn(a, b); }
inline float qk_div_rn(float a, float b) { return __fdiv_rn(a, b); }
inline float qk_sqrt_rn(float a) { return __fsqrt_rn(a); }

#endif  // QLORAKIT_HOST_EMULATION

#ifndef QK_PARAM_T
#define QK_PARAM_T float
#endif

__device__ __forceinline__ float qk_param_to_float(float value) { return value; }
__device__ __forceinline__ float qk_param_to_float(__nv_bfloat16 value) { return __bfloat162float(value); }
__device__ __forceinline__ float qk_param_to_float(__half value) { return __half2float(value); }

__device__ __forceinline__ void qk_store_param(float* slot, float value) { *slot = value; }
__device__ __forceinline__ void qk_store_param(__nv_bfloat16* slot, float value) { *slot = __float2bfloat16_rn(value); }
__device__ __forceinline__ void qk_store_param(__half* slot, float value) { *slot = __float2half_rn(value); }

// Elementwise over the n elements of one parameter with a grid-stride loop, so the host can
// cap the grid at a few waves of the GPU whatever the parameter's size.
extern "C" __global__ void paged_adam_step(
    QK_PARAM_T* __restrict__ param,
    const QK_PARAM_T* __restrict__ grad,
    float* __restrict__ exp_avg,
    float* __restrict__ exp_avg_sq,
    long long n,
    float grad_weight_decay,      // Adam: weight decay added to the gradient (L2); 0 for AdamW
    float param_scale,            // AdamW: 1 - lr * weight_decay (decoupled decay); 1 for Adam
    float beta1_weight,           // 1 - beta1, the weight of lerp(exp_avg, grad, .)
    float beta2,
    float one_minus_beta2,
    float bias_correction2_sqrt,  // sqrt(1 - beta2^step)
    float eps,
    float neg_step_size)          // -lr / (1 - beta1^step)
{
    // torch's vectorized lerp: weight w < 0.5 -> m + w * (g - m), else g - (1 - w) * (g - m),
    // either as one fused multiply-add; the branch is the same for every element.
    const bool small_weight = beta1_weight < 0.5f && beta1_weight > -0.5f;
    const float lerp_coeff = small_weight ? beta1_weight : qk_sub_rn(beta1_weight, 1.0f);

    const long long stride = (long long)gridDim.x * (long long)blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float p = qk_param_to_float(param[i]);
        float g = qk_param_to_float(grad[i]);
        float m = exp_avg[i];
        float v = exp_avg_sq[i];

        // torch applies either form of decay only when weight_decay != 0 (the host then passes
        // 0 and 1), so a parameter without decay is not even multiplied by 1.
        if (grad_weight_decay != 0.0f) {
            g = qk_fma_rn(p, grad_weight_decay, g);
        }
        if (param_scale != 1.0f) {
            p = qk_mul_rn(p, param_scale);
        }

        m = qk_fma_rn(lerp_coeff, qk_sub_rn(g, m), small_weight ? m : g);
        v = qk_fma_rn(qk_mul_rn(one_minus_beta2, g), g, qk_mul_rn(v, beta2));

        const float denom = qk_add_rn(qk_div_rn(qk_sqrt_rn(v), bias_correction2_sqrt), eps);
        p = qk_add_rn(p, qk_div_rn(qk_mul_rn(neg_step_size, m), denom));

        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        qk_store_param(&param[i], p);
    }
}
