// Token and position embeddings: the forward gathers rows of wte and wpe, the backward adds
// the output gradient back into them in a fixed order (no atomics).
//
// Shapes: B batch, T sequence, C channels, Vp padded vocabulary, N = B * T rows; row-major.
#include "common.cuh"

// out (N,C) = wte[tokens[row]] + wpe[row % T]. A token >= Vp fills its row with NaN.
template <typename T>
__device__ void encoder_forward(T* out, const unsigned int* tokens, const T* wte, const T* wpe,
                                int n, int t, int c, int vp) {
    LZ_FOR_EACH(i, (size_t)n * c) {
        const size_t row = i / c;
        const size_t ch = i % c;
        const unsigned int token = tokens[row];
        float value = quiet_nan();
        if (token < (unsigned int)vp) {
            value = load(wte, (size_t)token * c + ch) + load(wpe, (row % t) * c + ch);
        }
        store(out, i, value);
    }
}

// dwte (Vp,C) += the rows of dout (N,C) of each token. One block per row of dout: the block of
// the first row holding a token adds every row with that token, in row order (the CPU
// reference's order), and every other block leaves at once. So each row of dwte has one
// writer and a fixed summation order. Tokens >= Vp are skipped.
template <typename T>
__device__ void encoder_wte_backward(T* dwte, const T* dout, const unsigned int* tokens, int n,
                                     int c, int vp) {
    const int row = blockIdx.x;
    const unsigned int token = tokens[row];
    // The same for every thread of the block, so the whole block leaves together.
    if (token >= (unsigned int)vp) {
        return;
    }
    int seen_before = 0;
    for (int r = threadIdx.x; r < row; r += blockDim.x) {
        seen_before |= (tokens[r] == token);
    }
    if (__syncthreads_or(seen_before)) {
        return;
    }
    for (int ch = threadIdx.x; ch < c; ch += blockDim.x) {
        const size_t at = (size_t)token * c + ch;
        float acc = load(dwte, at);
        for (int r = row; r < n; ++r) {
            // Every thread reads the same token, so the branch never diverges.
            if (tokens[r] == token) {
                acc += load(dout, (size_t)r * c + ch);
            }
        }
        store(dwte, at, acc);
    }
}

// dwpe (maxT,C): its first T rows += the sum over the batch of dout (B,T,C), batch by batch in
// order. One thread per element of dwpe[..T].
template <typename T>
__device__ void encoder_wpe_backward(T* dwpe, const T* dout, int b, int t, int c) {
    const size_t plane = (size_t)t * c;
    LZ_FOR_EACH(i, plane) {
        float acc = load(dwpe, i);
        for (int batch = 0; batch < b; ++batch) {
            acc += load(dout, batch * plane + i);
        }
        store(dwpe, i, acc);
    }
}

extern "C" __global__ void encoder_forward_f32(float* out, const unsigned int* tokens,
                                               const float* wte, const float* wpe, int n, int t,
                                               int c, int vp) {
    encoder_forward(out, tokens, wte, wpe, n, t, c, vp);
}

extern "C" __global__ void encoder_forward_bf16(bf16* out, const unsigned int* tokens,
                                                const bf16* wte, const bf16* wpe, int n, int t,
                                                int c, int vp) {
    encoder_forward(out, tokens, wte, wpe, n, t, c, vp);
}

extern "C" __global__ void encoder_wte_backward_f32(float* dwte, const float* dout,
                                                    const unsigned int* tokens, int n, int c,
                                                    int vp) {
    encoder_wte_backward(dwte, dout, tokens, n, c, vp);
}

extern "C" __global__ void encoder_wte_backward_bf16(bf16* dwte, const bf16* dout,
                                                     const unsigned int* tokens, int n, int c,
                                                     int vp) {
    encoder_wte_backward(dwte, dout, tokens, n, c, vp);
}

extern "C" __global__ void encoder_wpe_backward_f32(float* dwpe, const float* dout, int b, int t,
                                                    int c) {
    encoder_wpe_backward(dwpe, dout, b, t, c);
}

extern "C" __global__ void encoder_wpe_backward_bf16(bf16* dwpe, const bf16* dout, int b, int t,
                                                     int c) {
    encoder_wpe_backward(dwpe, dout, b, t, c);
}
