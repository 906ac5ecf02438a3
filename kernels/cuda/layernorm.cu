// Layer normalisation over the channels of each row, with the mean and reciprocal standard
// deviation (always f32) saved for the backward pass.
//
// Shapes: N rows, C channels; inp/out/dout/dinp (N,C), weight/bias (C), mean/rstd (N).
#include "common.cuh"

// One block of LZ_ROW_THREADS threads per row. eps = 1e-5 as in GPT-2.
template <typename T>
__device__ void layernorm_forward(T* out, float* mean, float* rstd, const T* inp,
                                  const T* weight, const T* bias, int c) {
    const size_t base = (size_t)blockIdx.x * c;
    const T* x = inp + base;
    float sum = 0.0f;
    for (int ch = threadIdx.x; ch < c; ch += LZ_ROW_THREADS) {
        sum += load(x, ch);
    }
    const float mu = block_sum(sum) / (float)c;
    float squares = 0.0f;
    for (int ch = threadIdx.x; ch < c; ch += LZ_ROW_THREADS) {
        const float d = load(x, ch) - mu;
        squares += d * d;
    }
    const float var = block_sum(squares) / (float)c;
    const float r = 1.0f / sqrtf(var + 1e-5f);
    for (int ch = threadIdx.x; ch < c; ch += LZ_ROW_THREADS) {
        const float norm = (load(x, ch) - mu) * r;
        store(out + base, ch, norm * load(weight, ch) + load(bias, ch));
    }
    if (threadIdx.x == 0) {
        mean[blockIdx.x] = mu;
        rstd[blockIdx.x] = r;
    }
}

// dinp += the gradient through the normalisation of each row. One block per row.
template <typename T>
__device__ void layernorm_inp_backward(T* dinp, const T* dout, const T* inp, const T* weight,
                                       const float* mean, const float* rstd, int c) {
    const size_t base = (size_t)blockIdx.x * c;
    const T* x = inp + base;
    const T* dy = dout + base;
    const float mu = mean[blockIdx.x];
    const float r = rstd[blockIdx.x];
    float dnorm_sum = 0.0f;
    float dnorm_norm_sum = 0.0f;
    for (int ch = threadIdx.x; ch < c; ch += LZ_ROW_THREADS) {
        const float dnorm = load(weight, ch) * load(dy, ch);
        dnorm_sum += dnorm;
        dnorm_norm_sum += dnorm * ((load(x, ch) - mu) * r);
    }
    const float dnorm_mean = block_sum(dnorm_sum) / (float)c;
    const float dnorm_norm_mean = block_sum(dnorm_norm_sum) / (float)c;
    for (int ch = threadIdx.x; ch < c; ch += LZ_ROW_THREADS) {
        const float norm = (load(x, ch) - mu) * r;
        const float grad =
            (load(weight, ch) * load(dy, ch) - dnorm_mean - norm * dnorm_norm_mean) * r;
        store(dinp + base, ch, load(dinp + base, ch) + grad);
    }
}

// dweight += sum over rows of norm * dout, dbias += sum over rows of dout. Blocks of
// (LZ_COL_TILE, LZ_COL_LANES) threads own LZ_COL_TILE channels; see lane_sum for the order.
template <typename T>
__device__ void layernorm_params_backward(T* dweight, T* dbias, const T* dout, const T* inp,
                                          const float* mean, const float* rstd, int n, int c) {
    const int ch = blockIdx.x * LZ_COL_TILE + threadIdx.x;
    float dw = 0.0f;
    float db = 0.0f;
    if (ch < c) {
        for (int row = threadIdx.y; row < n; row += LZ_COL_LANES) {
            const size_t at = (size_t)row * c + ch;
            const float dy = load(dout, at);
            dw += (load(inp, at) - mean[row]) * rstd[row] * dy;
            db += dy;
        }
    }
    // Every thread takes part in both reductions: they synchronise the block.
    dw = lane_sum(dw);
    db = lane_sum(db);
    if (threadIdx.y == 0 && ch < c) {
        store(dweight, ch, load(dweight, ch) + dw);
        store(dbias, ch, load(dbias, ch) + db);
    }
}

extern "C" __global__ void layernorm_forward_f32(float* out, float* mean, float* rstd,
                                                 const float* inp, const float* weight,
                                                 const float* bias, int c) {
    layernorm_forward(out, mean, rstd, inp, weight, bias, c);
}

extern "C" __global__ void layernorm_forward_bf16(bf16* out, float* mean, float* rstd,
                                                  const bf16* inp, const bf16* weight,
                                                  const bf16* bias, int c) {
    layernorm_forward(out, mean, rstd, inp, weight, bias, c);
}

extern "C" __global__ void layernorm_inp_backward_f32(float* dinp, const float* dout,
                                                      const float* inp, const float* weight,
                                                      const float* mean, const float* rstd,
                                                      int c) {
    layernorm_inp_backward(dinp, dout, inp, weight, mean, rstd, c);
}

extern "C" __global__ void layernorm_inp_backward_bf16(bf16* dinp, const bf16* dout,
                                                       const bf16* inp, const bf16* weight,
                                                       const float* mean, const float* rstd,
                                                       int c) {
    layernorm_inp_backward(dinp, dout, inp, weight, mean, rstd, c);
}

extern "C" __global__ void layernorm_params_backward_f32(float* dweight, float* dbias,
                                                         const float* dout, const float* inp,
                                                         const float* mean, const float* rstd,
                                                         int n, int c) {
    layernorm_params_backward(dweight, dbias, dout, inp, mean, rstd, n, c);
}

extern "C" __global__ void layernorm_params_backward_bf16(bf16* dweight, bf16* dbias,
                                                          const bf16* dout, const bf16* inp,
                                                          const float* mean, const float* rstd,
                                                          int n, int c) {
    layernorm_params_backward(dweight, dbias, dout, inp, mean, rstd, n, c);
}
