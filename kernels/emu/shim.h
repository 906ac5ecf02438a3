// What the kernel sources of kernels/cuda/ need from CUDA C++ (thread and block indices,
// __syncthreads, bit casts), for compiling them natively into the stand-in libcuda.so of
// scripts/cuda-emu.sh. A test harness only: no build of Lazarus uses it.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <math.h>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
extern thread_local dim3 threadIdx;
extern dim3 blockIdx, blockDim, gridDim;
extern std::barrier<>* g_barrier;
extern std::atomic<int> g_or;
extern unsigned char* g_dyn_smem;
inline void __syncthreads() { g_barrier->arrive_and_wait(); }
inline int __syncthreads_or(int p) {
    g_barrier->arrive_and_wait();
    if (p) g_or.store(1);
    g_barrier->arrive_and_wait();
    int r = g_or.load();
    g_barrier->arrive_and_wait();
    if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) g_or.store(0);
    g_barrier->arrive_and_wait();
    return r;
}
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
#define __device__ inline
#define __forceinline__
#define __global__
#define __align__(n) alignas(n)
#define __shared__ static
