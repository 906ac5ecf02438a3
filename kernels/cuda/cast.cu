// Conversions between f32 (master weights, gradients) and bf16 storage, rounding to nearest
// with ties to even. One thread per element through a grid-stride loop.
#include "common.cuh"

extern "C" __global__ void cast_f32_to_bf16(bf16* out, const float* inp, unsigned long long n) {
    LZ_FOR_EACH(i, n) { out[i] = from_f32<bf16>(inp[i]); }
}

extern "C" __global__ void cast_bf16_to_f32(float* out, const bf16* inp, unsigned long long n) {
    LZ_FOR_EACH(i, n) { out[i] = to_f32(inp[i]); }
}
