// The AdamW update and the helpers of gradient clipping, on f32 master weights only.
#include "common.cuh"

// Decoupled AdamW, one thread per element, the CPU reference's formula step for step. The bias
// corrections 1 - beta^step arrive precomputed (in f64 on the host, then rounded to f32).
extern "C" __global__ void adamw_update_f32(float* params, const float* grads, float* m, float* v,
                                            unsigned long long n, float lr, float beta1,
                                            float beta2, float eps, float weight_decay,
                                            float correction1, float correction2) {
    LZ_FOR_EACH(i, n) {
        const float g = grads[i];
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float m_hat = mi / correction1;
        const float v_hat = vi / correction2;
        const float p = params[i];
        params[i] = p - lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * p);
    }
}

// Partial sums of squares in f64: block b (LZ_ROW_THREADS threads) sums the elements
// [b * chunk, min(n, (b + 1) * chunk)) into partials[b]. The host adds the partials in block
// order. The chunk is a function of n alone, so the result is bit-identical from run to run.
extern "C" __global__ void global_norm_squared_f32(double* partials, const float* x,
                                                   unsigned long long n,
                                                   unsigned long long chunk) {
    const unsigned long long start = (unsigned long long)blockIdx.x * chunk;
    const unsigned long long end = start + chunk < n ? start + chunk : n;
    double acc = 0.0;
    for (unsigned long long i = start + threadIdx.x; i < end; i += LZ_ROW_THREADS) {
        const double value = (double)x[i];
        acc += value * value;
    }
    const double total = block_sum(acc);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = total;
    }
}

// x *= s (gradient clipping).
extern "C" __global__ void scale_f32(float* x, unsigned long long n, float s) {
    LZ_FOR_EACH(i, n) { x[i] *= s; }
}
