// Causal multi-head self-attention over a packed q,k,v tensor, with the scores (preatt) and
// their softmax (att) saved for the backward pass.
//
// Shapes: B batch, T sequence, C channels, NH heads, hs = C / NH; qkv (B,T,3C) holds q, k, v
// in that order, head h using channels h*hs .. (h+1)*hs of each; out/dout (B,T,C);
// preatt/att/dpreatt/datt (B,NH,T,T), entries above the diagonal 0. A "score row" is one
// (b, h, t) row of those, numbered ((b * NH + h) * T + t).
#include "common.cuh"

// Indices of one score row.
struct ScoreRow {
    size_t b;
    int h;
    int t;
};

__device__ __forceinline__ ScoreRow score_row(size_t id, int t_len, int nh) {
    ScoreRow r;
    r.t = (int)(id % t_len);
    const size_t bh = id / t_len;
    r.h = (int)(bh % nh);
    r.b = bh / nh;
    return r;
}

// Offset of channel `ch` of part `part` (0 q, 1 k, 2 v) of the qkv row at (b, t).
__device__ __forceinline__ size_t qkv_at(size_t b, int t, int part, int ch, int t_len, int c) {
    return (b * t_len + t) * 3 * (size_t)c + (size_t)part * c + ch;
}

// 1/sqrt(hs), the scale of the dot-product scores.
__device__ __forceinline__ float score_scale(int hs) { return 1.0f / sqrtf((float)hs); }

// One block of LZ_ROW_THREADS threads per score row; dynamic shared memory holds the row's T
// scores in f32, so the softmax never sees the storage type's rounding.
template <typename T>
__device__ void attention_softmax_forward(T* preatt, T* att, const T* qkv, int t_len, int c,
                                          int nh) {
    extern __shared__ float scores[];
    const size_t id = blockIdx.x;
    const ScoreRow row = score_row(id, t_len, nh);
    const int hs = c / nh;
    const float scale = score_scale(hs);
    const size_t q = qkv_at(row.b, row.t, 0, row.h * hs, t_len, c);
    T* pre_row = preatt + id * t_len;
    T* att_row = att + id * t_len;
    float local_max = -__uint_as_float(0x7f800000u);
    for (int t2 = threadIdx.x; t2 <= row.t; t2 += LZ_ROW_THREADS) {
        const size_t k = qkv_at(row.b, t2, 1, row.h * hs, t_len, c);
        float dot = 0.0f;
        for (int i = 0; i < hs; ++i) {
            dot += load(qkv, q + i) * load(qkv, k + i);
        }
        const float score = dot * scale;
        scores[t2] = score;
        store(pre_row, t2, score);
        local_max = fmaxf(local_max, score);
    }
    const float max = block_max(local_max);
    float local_sum = 0.0f;
    for (int t2 = threadIdx.x; t2 <= row.t; t2 += LZ_ROW_THREADS) {
        const float e = expf(scores[t2] - max);
        scores[t2] = e;
        local_sum += e;
    }
    const float inv_sum = 1.0f / block_sum(local_sum);
    for (int t2 = threadIdx.x; t2 < t_len; t2 += LZ_ROW_THREADS) {
        if (t2 <= row.t) {
            store(att_row, t2, scores[t2] * inv_sum);
        } else {
            store(pre_row, t2, 0.0f);
            store(att_row, t2, 0.0f);
        }
    }
}

// out (B,T,C): one thread per element, the att-weighted sum of the values t2 <= t, added in
// t2 order.
template <typename T>
__device__ void attention_values_forward(T* out, const T* att, const T* qkv, int n, int t_len,
                                         int c, int nh) {
    const int hs = c / nh;
    LZ_FOR_EACH(i, (size_t)n * c) {
        const int ch = (int)(i % c);
        const size_t bt = i / c;
        const int t = (int)(bt % t_len);
        const size_t b = bt / t_len;
        const int h = ch / hs;
        const T* att_row = att + ((b * nh + h) * t_len + t) * t_len;
        float acc = 0.0f;
        for (int t2 = 0; t2 <= t; ++t2) {
            acc += load(att_row, t2) * load(qkv, qkv_at(b, t2, 2, ch, t_len, c));
        }
        store(out, i, acc);
    }
}

// Overwrites datt and dpreatt of one score row (block of LZ_ROW_THREADS threads, dynamic shared
// memory of T f32): datt = v . dout_head, dpreatt = att * (datt - sum(att * datt)), the
// softmax Jacobian contracted in O(T).
template <typename T>
__device__ void attention_scores_backward(T* dpreatt, T* datt, const T* dout, const T* qkv,
                                          const T* att, int t_len, int c, int nh) {
    extern __shared__ float datt_row_f32[];
    const size_t id = blockIdx.x;
    const ScoreRow row = score_row(id, t_len, nh);
    const int hs = c / nh;
    const size_t dy = (row.b * t_len + row.t) * (size_t)c + (size_t)row.h * hs;
    const T* att_row = att + id * t_len;
    float local = 0.0f;
    for (int t2 = threadIdx.x; t2 <= row.t; t2 += LZ_ROW_THREADS) {
        const size_t v = qkv_at(row.b, t2, 2, row.h * hs, t_len, c);
        float dot = 0.0f;
        for (int i = 0; i < hs; ++i) {
            dot += load(qkv, v + i) * load(dout, dy + i);
        }
        datt_row_f32[t2] = dot;
        local += load(att_row, t2) * dot;
    }
    const float weighted = block_sum(local);
    T* datt_row = datt + id * t_len;
    T* dpre_row = dpreatt + id * t_len;
    for (int t2 = threadIdx.x; t2 < t_len; t2 += LZ_ROW_THREADS) {
        if (t2 <= row.t) {
            const float da = datt_row_f32[t2];
            store(datt_row, t2, da);
            store(dpre_row, t2, load(att_row, t2) * (da - weighted));
        } else {
            store(datt_row, t2, 0.0f);
            store(dpre_row, t2, 0.0f);
        }
    }
}

// dinp (B,T,3C) += the q, k and v gradients; one thread per element, each sum in the CPU
// reference's order. The query at t attends to keys t2 <= t; the key and value at t are used
// by queries t3 >= t.
template <typename T>
__device__ void attention_qkv_backward(T* dinp, const T* dpreatt, const T* dout, const T* qkv,
                                       const T* att, int n, int t_len, int c, int nh) {
    const int hs = c / nh;
    const float scale = score_scale(hs);
    const size_t width = 3 * (size_t)c;
    LZ_FOR_EACH(i, (size_t)n * width) {
        const int col = (int)(i % width);
        const size_t bt = i / width;
        const int t = (int)(bt % t_len);
        const size_t b = bt / t_len;
        const int part = col / c;
        const int ch = col % c;
        const int h = ch / hs;
        // Score row (b, h, tq) starts at ((b * NH + h) * T + tq) * T.
        const size_t rows = (b * nh + h) * (size_t)t_len;
        float acc = load(dinp, i);
        if (part == 0) {
            const size_t dpre_row = (rows + t) * t_len;
            for (int t2 = 0; t2 <= t; ++t2) {
                acc += (load(dpreatt, dpre_row + t2) * scale) *
                       load(qkv, qkv_at(b, t2, 1, ch, t_len, c));
            }
        } else if (part == 1) {
            for (int t3 = t; t3 < t_len; ++t3) {
                acc += (load(dpreatt, (rows + t3) * t_len + t) * scale) *
                       load(qkv, qkv_at(b, t3, 0, ch, t_len, c));
            }
        } else {
            for (int t3 = t; t3 < t_len; ++t3) {
                acc += load(att, (rows + t3) * t_len + t) *
                       load(dout, (b * t_len + t3) * (size_t)c + ch);
            }
        }
        store(dinp, i, acc);
    }
}

extern "C" __global__ void attention_softmax_forward_f32(float* preatt, float* att,
                                                         const float* qkv, int t_len, int c,
                                                         int nh) {
    attention_softmax_forward(preatt, att, qkv, t_len, c, nh);
}

extern "C" __global__ void attention_softmax_forward_bf16(bf16* preatt, bf16* att,
                                                          const bf16* qkv, int t_len, int c,
                                                          int nh) {
    attention_softmax_forward(preatt, att, qkv, t_len, c, nh);
}

extern "C" __global__ void attention_values_forward_f32(float* out, const float* att,
                                                        const float* qkv, int n, int t_len,
                                                        int c, int nh) {
    attention_values_forward(out, att, qkv, n, t_len, c, nh);
}

extern "C" __global__ void attention_values_forward_bf16(bf16* out, const bf16* att,
                                                         const bf16* qkv, int n, int t_len,
                                                         int c, int nh) {
    attention_values_forward(out, att, qkv, n, t_len, c, nh);
}

extern "C" __global__ void attention_scores_backward_f32(float* dpreatt, float* datt,
                                                         const float* dout, const float* qkv,
                                                         const float* att, int t_len, int c,
                                                         int nh) {
    attention_scores_backward(dpreatt, datt, dout, qkv, att, t_len, c, nh);
}

extern "C" __global__ void attention_scores_backward_bf16(bf16* dpreatt, bf16* datt,
                                                          const bf16* dout, const bf16* qkv,
                                                          const bf16* att, int t_len, int c,
                                                          int nh) {
    attention_scores_backward(dpreatt, datt, dout, qkv, att, t_len, c, nh);
}

extern "C" __global__ void attention_qkv_backward_f32(float* dinp, const float* dpreatt,
                                                      const float* dout, const float* qkv,
                                                      const float* att, int n, int t_len, int c,
                                                      int nh) {
    attention_qkv_backward(dinp, dpreatt, dout, qkv, att, n, t_len, c, nh);
}

extern "C" __global__ void attention_qkv_backward_bf16(bf16* dinp, const bf16* dpreatt,
                                                       const bf16* dout, const bf16* qkv,
                                                       const bf16* att, int n, int t_len, int c,
                                                       int nh) {
    attention_qkv_backward(dinp, dpreatt, dout, qkv, att, n, t_len, c, nh);
}
