// The parts of the fully connected layer that cuBLASLt does not do for us: the bias gradient
// (a column sum in a fixed order, never atomics) and the bias broadcast used when the bias
// cannot be fused into the GEMM as an epilogue.
//
// Shapes: N rows, OC output channels; out/dout (N,OC), bias/dbias (OC).
#include "common.cuh"

// out[row] = bias for every row; the GEMM then accumulates onto it with beta = 1.
template <typename T>
__device__ void matmul_bias_forward(T* out, const T* bias, int n, int oc) {
    LZ_FOR_EACH(i, (size_t)n * oc) { out[i] = bias[i % oc]; }
}

// dbias += the column sums of dout. Blocks of (LZ_COL_TILE, LZ_COL_LANES) threads own
// LZ_COL_TILE columns; see lane_sum for the order.
template <typename T>
__device__ void matmul_bias_backward(T* dbias, const T* dout, int n, int oc) {
    const int col = blockIdx.x * LZ_COL_TILE + threadIdx.x;
    float acc = 0.0f;
    if (col < oc) {
        for (int row = threadIdx.y; row < n; row += LZ_COL_LANES) {
            acc += load(dout, (size_t)row * oc + col);
        }
    }
    acc = lane_sum(acc);
    if (threadIdx.y == 0 && col < oc) {
        store(dbias, col, load(dbias, col) + acc);
    }
}

extern "C" __global__ void matmul_bias_forward_f32(float* out, const float* bias, int n, int oc) {
    matmul_bias_forward(out, bias, n, oc);
}

extern "C" __global__ void matmul_bias_forward_bf16(bf16* out, const bf16* bias, int n, int oc) {
    matmul_bias_forward(out, bias, n, oc);
}

extern "C" __global__ void matmul_bias_backward_f32(float* dbias, const float* dout, int n,
                                                    int oc) {
    matmul_bias_backward(dbias, dout, n, oc);
}

extern "C" __global__ void matmul_bias_backward_bf16(bf16* dbias, const bf16* dout, int n,
                                                     int oc) {
    matmul_bias_backward(dbias, dout, n, oc);
}
