// Softmax over the real vocabulary, alone (for sampling) and fused with the cross-entropy loss
// and its gradient (for training). Padded columns V..Vp are never read.
//
// Shapes: N rows, V real vocabulary, Vp padded vocabulary; logits/probs (N,Vp), targets and
// losses (N). Losses are always f32. One block of LZ_ROW_THREADS threads per row.
#include "common.cuh"

// The maximum and the sum of exp(x - max) over the first v columns of one row.
template <typename T>
__device__ void row_max_and_sum(const T* x, int v, float* max_out, float* sum_out) {
    float local_max = -__uint_as_float(0x7f800000u);
    for (int i = threadIdx.x; i < v; i += LZ_ROW_THREADS) {
        local_max = fmaxf(local_max, load(x, i));
    }
    const float max = block_max(local_max);
    float local_sum = 0.0f;
    for (int i = threadIdx.x; i < v; i += LZ_ROW_THREADS) {
        local_sum += expf(load(x, i) - max);
    }
    *max_out = max;
    *sum_out = block_sum(local_sum);
}

// probs = softmax(logits[row, ..v]), padded columns 0.
template <typename T>
__device__ void softmax_forward(T* probs, const T* logits, int v, int vp) {
    const size_t base = (size_t)blockIdx.x * vp;
    const T* x = logits + base;
    float max;
    float sum;
    row_max_and_sum(x, v, &max, &sum);
    const float inv_sum = 1.0f / sum;
    for (int i = threadIdx.x; i < vp; i += LZ_ROW_THREADS) {
        store(probs + base, i, i < v ? expf(load(x, i) - max) * inv_sum : 0.0f);
    }
}

// losses[row] = log-sum-exp minus the target logit (finite where log(prob) would underflow).
// A target >= v gives a NaN loss instead of an out-of-bounds read.
template <typename T>
__device__ void softmax_crossentropy_forward(float* losses, const T* logits,
                                             const unsigned int* targets, int v, int vp) {
    const size_t base = (size_t)blockIdx.x * vp;
    const T* x = logits + base;
    const unsigned int target = targets[blockIdx.x];
    float max;
    float sum;
    row_max_and_sum(x, v, &max, &sum);
    if (threadIdx.x == 0) {
        losses[blockIdx.x] =
            target < (unsigned int)v ? logf(sum) - (load(x, target) - max) : quiet_nan();
    }
}

// The fused training pass: writes losses like the forward and overwrites the row IN PLACE with
// dlogits = dloss * (softmax - onehot(target)), 0 in padded columns. The reductions' barriers
// make every read of the row happen before the first write. A target >= v gives NaN.
template <typename T>
__device__ void softmax_crossentropy_backward(T* logits_to_dlogits, float* losses,
                                              const unsigned int* targets, float dloss, int v,
                                              int vp) {
    const size_t base = (size_t)blockIdx.x * vp;
    T* x = logits_to_dlogits + base;
    const unsigned int target = targets[blockIdx.x];
    const bool valid = target < (unsigned int)v;
    const float target_logit = valid ? load(x, target) : quiet_nan();
    float max;
    float sum;
    row_max_and_sum(x, v, &max, &sum);
    if (threadIdx.x == 0) {
        losses[blockIdx.x] = logf(sum) - (target_logit - max);
    }
    const float inv_sum = 1.0f / sum;
    for (int i = threadIdx.x; i < vp; i += LZ_ROW_THREADS) {
        float grad = 0.0f;
        if (i < v) {
            const float onehot = (unsigned int)i == target ? 1.0f : 0.0f;
            grad = valid ? dloss * (expf(load(x, i) - max) * inv_sum - onehot) : quiet_nan();
        }
        store(x, i, grad);
    }
}

extern "C" __global__ void softmax_forward_f32(float* probs, const float* logits, int v, int vp) {
    softmax_forward(probs, logits, v, vp);
}

extern "C" __global__ void softmax_forward_bf16(bf16* probs, const bf16* logits, int v, int vp) {
    softmax_forward(probs, logits, v, vp);
}

extern "C" __global__ void softmax_crossentropy_forward_f32(float* losses, const float* logits,
                                                            const unsigned int* targets, int v,
                                                            int vp) {
    softmax_crossentropy_forward(losses, logits, targets, v, vp);
}

extern "C" __global__ void softmax_crossentropy_forward_bf16(float* losses, const bf16* logits,
                                                             const unsigned int* targets, int v,
                                                             int vp) {
    softmax_crossentropy_forward(losses, logits, targets, v, vp);
}

extern "C" __global__ void softmax_crossentropy_backward_f32(float* logits_to_dlogits,
                                                             float* losses,
                                                             const unsigned int* targets,
                                                             float dloss, int v, int vp) {
    softmax_crossentropy_backward(logits_to_dlogits, losses, targets, dloss, v, vp);
}

extern "C" __global__ void softmax_crossentropy_backward_bf16(bf16* logits_to_dlogits,
                                                              float* losses,
                                                              const unsigned int* targets,
                                                              float dloss, int v, int vp) {
    softmax_crossentropy_backward(logits_to_dlogits, losses, targets, dloss, v, vp);
}
