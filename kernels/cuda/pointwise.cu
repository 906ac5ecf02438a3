// Element-wise kernels: the GELU activation (tanh approximation) and the residual addition.
// One thread per element through a grid-stride loop; any shape, n elements.
#include "common.cuh"

// sqrt(2/pi) and the cubic coefficient of GPT-2's tanh approximation of GELU, rounded to f32
// as the CPU reference rounds them.
#define GELU_SCALE 0.7978845608028654f
#define GELU_CUBIC 0.044715f
// 3 * 0.044715, rounded once (the CPU reference computes it in f64 and then rounds).
#define GELU_CUBIC3 0.134145f

// out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
template <typename T>
__device__ void gelu_forward(T* out, const T* inp, unsigned long long n) {
    LZ_FOR_EACH(i, n) {
        const float x = load(inp, i);
        store(out, i, 0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + GELU_CUBIC * x * x * x))));
    }
}

// dinp += dout * gelu'(inp).
template <typename T>
__device__ void gelu_backward(T* dinp, const T* inp, const T* dout, unsigned long long n) {
    LZ_FOR_EACH(i, n) {
        const float x = load(inp, i);
        const float th = tanhf(GELU_SCALE * (x + GELU_CUBIC * x * x * x));
        // sech^2 = 1 - tanh^2 avoids cosh, which overflows for large arguments.
        const float sech2 = 1.0f - th * th;
        const float grad = 0.5f * (1.0f + th) +
                           x * 0.5f * sech2 * GELU_SCALE * (1.0f + GELU_CUBIC3 * x * x);
        store(dinp, i, load(dinp, i) + grad * load(dout, i));
    }
}

// out = a + b.
template <typename T>
__device__ void residual_forward(T* out, const T* a, const T* b, unsigned long long n) {
    LZ_FOR_EACH(i, n) { store(out, i, load(a, i) + load(b, i)); }
}

// da += dout; db += dout.
template <typename T>
__device__ void residual_backward(T* da, T* db, const T* dout, unsigned long long n) {
    LZ_FOR_EACH(i, n) {
        const float d = load(dout, i);
        store(da, i, load(da, i) + d);
        store(db, i, load(db, i) + d);
    }
}

extern "C" __global__ void gelu_forward_f32(float* out, const float* inp, unsigned long long n) {
    gelu_forward(out, inp, n);
}

extern "C" __global__ void gelu_forward_bf16(bf16* out, const bf16* inp, unsigned long long n) {
    gelu_forward(out, inp, n);
}

extern "C" __global__ void gelu_backward_f32(float* dinp, const float* inp, const float* dout,
                                             unsigned long long n) {
    gelu_backward(dinp, inp, dout, n);
}

extern "C" __global__ void gelu_backward_bf16(bf16* dinp, const bf16* inp, const bf16* dout,
                                              unsigned long long n) {
    gelu_backward(dinp, inp, dout, n);
}

extern "C" __global__ void residual_forward_f32(float* out, const float* a, const float* b,
                                                unsigned long long n) {
    residual_forward(out, a, b, n);
}

extern "C" __global__ void residual_forward_bf16(bf16* out, const bf16* a, const bf16* b,
                                                 unsigned long long n) {
    residual_forward(out, a, b, n);
}

extern "C" __global__ void residual_backward_f32(float* da, float* db, const float* dout,
                                                 unsigned long long n) {
    residual_backward(da, db, dout, n);
}

extern "C" __global__ void residual_backward_bf16(bf16* da, bf16* db, const bf16* dout,
                                                  unsigned long long n) {
    residual_backward(da, db, dout, n);
}
