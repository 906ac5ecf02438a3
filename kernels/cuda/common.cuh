// Helpers shared by every Lazarus kernel: bf16 storage with f32 math, loads and stores for both
// element types, grid-stride loops, and block reductions whose summation order is fixed.
//
// Compiled by NVRTC with nothing but its built-ins (no CUDA toolkit headers), so bf16 is our
// own 16-bit storage type. The launch constants LZ_* come from the Rust side
// (kernels/src/cuda/compile.rs) as -D options, so the kernels and their launches cannot drift.
#pragma once

#if !defined(LZ_ROW_THREADS) || !defined(LZ_COL_TILE) || !defined(LZ_COL_LANES)
#error "LZ_ROW_THREADS, LZ_COL_TILE and LZ_COL_LANES must be passed as -D options"
#endif

static_assert((LZ_ROW_THREADS & (LZ_ROW_THREADS - 1)) == 0, "the tree reductions need a power of two");
static_assert((LZ_COL_LANES & (LZ_COL_LANES - 1)) == 0, "the tree reductions need a power of two");

// A bfloat16 value in storage: the top 16 bits of an f32. All arithmetic happens in f32.
struct __align__(2) bf16 {
    unsigned short bits;
};

__device__ __forceinline__ float to_f32(float x) { return x; }

__device__ __forceinline__ float to_f32(bf16 x) {
    return __uint_as_float(((unsigned int)x.bits) << 16);
}

template <typename T>
__device__ __forceinline__ T from_f32(float x);

template <>
__device__ __forceinline__ float from_f32<float>(float x) {
    return x;
}

// f32 -> bf16, rounding to nearest with ties to even (as the `half` crate does), so host and
// device conversions agree bit for bit.
template <>
__device__ __forceinline__ bf16 from_f32<bf16>(float x) {
    const unsigned int u = __float_as_uint(x);
    bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        // A NaN keeps its sign and top payload bits; the quiet bit keeps it a NaN after the cut.
        r.bits = (unsigned short)((u >> 16) | 0x0040u);
        return r;
    }
    // Adding 0x7fff plus the lowest kept bit carries into the kept bits exactly when the
    // dropped half is above one half, or equal to it with an odd kept part.
    const unsigned int lsb = (u >> 16) & 1u;
    r.bits = (unsigned short)((u + 0x7fffu + lsb) >> 16);
    return r;
}

template <typename T>
__device__ __forceinline__ float load(const T* p, size_t i) {
    return to_f32(p[i]);
}

template <typename T>
__device__ __forceinline__ void store(T* p, size_t i, float v) {
    p[i] = from_f32<T>(v);
}

// A quiet NaN, written where an input is out of range (a token or target id) instead of
// reading out of bounds: the loss then turns NaN and the trainer stops with a divergence.
__device__ __forceinline__ float quiet_nan() { return __uint_as_float(0x7fc00000u); }

// Grid-stride loop over [0, n): correct for any grid size.
#define LZ_FOR_EACH(i, n)                                                        \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)(n); \
         i += (size_t)gridDim.x * blockDim.x)

// The sum of one value per thread of a block of LZ_ROW_THREADS threads (1-D), returned to
// every thread. The tree pairs thread i with i + stride, halving the stride: the order depends
// on nothing but LZ_ROW_THREADS, so results are bit-identical from run to run.
template <typename A>
__device__ A block_sum(A v) {
    __shared__ A scratch[LZ_ROW_THREADS];
    const unsigned int tid = threadIdx.x;
    scratch[tid] = v;
    __syncthreads();
    for (unsigned int stride = LZ_ROW_THREADS / 2; stride > 0; stride /= 2) {
        if (tid < stride) {
            scratch[tid] += scratch[tid + stride];
        }
        __syncthreads();
    }
    const A total = scratch[0];
    // No thread may overwrite the scratch (next call) before every thread has read the total.
    __syncthreads();
    return total;
}

// The maximum over a block of LZ_ROW_THREADS threads, returned to every thread. fmaxf ignores a
// NaN operand, like the CPU reference's f32::max.
__device__ float block_max(float v) {
    __shared__ float scratch[LZ_ROW_THREADS];
    const unsigned int tid = threadIdx.x;
    scratch[tid] = v;
    __syncthreads();
    for (unsigned int stride = LZ_ROW_THREADS / 2; stride > 0; stride /= 2) {
        if (tid < stride) {
            scratch[tid] = fmaxf(scratch[tid], scratch[tid + stride]);
        }
        __syncthreads();
    }
    const float result = scratch[0];
    __syncthreads();
    return result;
}

// Column reductions run in blocks of (LZ_COL_TILE, LZ_COL_LANES) threads: threadIdx.x picks a
// column of the tile, threadIdx.y a lane that walks the rows lane, lane + LZ_COL_LANES, ... in
// order. This sums the lanes' partial sums of each column in a fixed tree order; the result
// is valid in the threads with threadIdx.y == 0.
__device__ float lane_sum(float v) {
    __shared__ float scratch[LZ_COL_LANES][LZ_COL_TILE];
    const unsigned int x = threadIdx.x;
    const unsigned int y = threadIdx.y;
    scratch[y][x] = v;
    __syncthreads();
    for (unsigned int stride = LZ_COL_LANES / 2; stride > 0; stride /= 2) {
        if (y < stride) {
            scratch[y][x] += scratch[y + stride][x];
        }
        __syncthreads();
    }
    const float total = scratch[0][x];
    __syncthreads();
    return total;
}
