// A stand-in libcuda.so for running the CUDA backend's tests on a machine without a GPU:
// "device" memory is host memory (every kernel pointer is checked against its allocation), and
// the kernels are the .cu sources compiled natively with shim.h, one OS thread per CUDA thread,
// blocks one after another, launches one at a time. It says nothing about speed, and it checks
// the kernels against our reading of CUDA's semantics, not against a GPU. Built by
// scripts/cuda-emu.sh.
#include "shim.h"
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>
thread_local dim3 threadIdx;
dim3 blockIdx, blockDim, gridDim;
std::barrier<>* g_barrier;
std::atomic<int> g_or{0};
unsigned char* g_dyn_smem;

static void check_ptr(const char* kernel, int i, const void* p);
#include "all_kernels.inc"

static std::map<uintptr_t, size_t> g_allocs;
static std::mutex g_mu;
static void die(const char* what) { fprintf(stderr, "FAKE CUDA: %s\n", what); abort(); }
static void check_ptr(const char* kernel, int i, const void* p) {
    std::lock_guard<std::mutex> l(g_mu);
    uintptr_t a = (uintptr_t)p;
    auto it = g_allocs.upper_bound(a);
    if (it == g_allocs.begin()) { fprintf(stderr, "FAKE CUDA: %s param %d = %p is not device memory\n", kernel, i, p); abort(); }
    --it;
    if (a >= it->first + it->second && !(it->second == 0 && a == it->first)) { fprintf(stderr, "FAKE CUDA: %s param %d = %p is past allocation %zx+%zu\n", kernel, i, p, (size_t)it->first, it->second); abort(); }
}

extern "C" {
typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
int cuInit(unsigned) { return 0; }
int cuDriverGetVersion(int* v) { *v = 13000; return 0; }
int cuDeviceGetCount(int* n) { *n = 1; return 0; }
int cuDeviceGet(CUdevice* d, int o) { if (o != 0) return 101; *d = 0; return 0; }
static int g_ctx_dummy;
int cuDevicePrimaryCtxRetain(void** ctx, CUdevice) { *ctx = &g_ctx_dummy; return 0; }
int cuDevicePrimaryCtxRelease_v2(CUdevice) { return 0; }
int cuCtxSetCurrent(void*) { return 0; }
int cuCtxGetCurrent(void** c) { *c = &g_ctx_dummy; return 0; }
int cuCtxSynchronize() { return 0; }
int cuDeviceGetName(char* name, int len, CUdevice) { snprintf(name, len, "Fake H100 (CPU emulation)"); return 0; }
int cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
        case 75: *v = 9; break;   // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        case 76: *v = 0; break;   // MINOR
        case 115: *v = 1; break;  // MEMORY_POOLS_SUPPORTED
        default: *v = 0;
    }
    return 0;
}
int cuDeviceTotalMem_v2(size_t* b, CUdevice) { *b = 80ull << 30; return 0; }
static int g_event_dummy;
int cuEventCreate(void** e, unsigned) { *e = &g_event_dummy; return 0; }
int cuEventDestroy_v2(void*) { return 0; }
int cuEventRecord(void*, void*) { return 0; }
int cuEventSynchronize(void*) { return 0; }
int cuEventQuery(void*) { return 0; }
int cuStreamWaitEvent(void*, void*, unsigned) { return 0; }
int cuStreamSynchronize(void*) { return 0; }
int cuStreamQuery(void*) { return 0; }
// Streams are only handles: every call runs to completion before it returns, so any order a
// program sets up between streams holds trivially (and races between streams cannot show).
static int g_stream_dummy[64];
static std::atomic<int> g_streams{0};
int cuStreamCreate(void** s, unsigned) { *s = &g_stream_dummy[g_streams++ % 64]; return 0; }
int cuStreamDestroy_v2(void*) { return 0; }
// Page-locked host memory is plain host memory, never accepted as a kernel argument.
int cuMemHostAlloc(void** p, size_t n, unsigned) {
    *p = aligned_alloc(256, (n + 255) / 256 * 256 + 256);
    return *p ? 0 : 2;  // CUDA_ERROR_OUT_OF_MEMORY
}
int cuMemFreeHost(void* p) { free(p); return 0; }
static CUdeviceptr alloc(size_t n) {
    size_t rounded = (n + 255) / 256 * 256;
    void* p = aligned_alloc(256, rounded ? rounded : 256);
    // Fill with garbage so reads of unwritten memory show.
    memset(p, 0xA5, rounded ? rounded : 256);
    std::lock_guard<std::mutex> l(g_mu);
    g_allocs[(uintptr_t)p] = n;
    return (CUdeviceptr)p;
}
static void release(CUdeviceptr p) {
    { std::lock_guard<std::mutex> l(g_mu); if (!g_allocs.erase((uintptr_t)p)) die("free of unknown pointer"); }
    free((void*)p);
}
int cuMemAllocAsync(CUdeviceptr* p, size_t n, void*) { *p = alloc(n); return 0; }
int cuMemAlloc_v2(CUdeviceptr* p, size_t n) { *p = alloc(n); return 0; }
int cuMemFreeAsync(CUdeviceptr p, void*) { release(p); return 0; }
int cuMemFree_v2(CUdeviceptr p) { release(p); return 0; }
static void check_range(CUdeviceptr p, size_t n) { if (n) { check_ptr("memop", 0, (void*)p); check_ptr("memop-end", 0, (void*)(p + n - 1)); } }
int cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, void*) { check_range(p, n); memset((void*)p, v, n); return 0; }
int cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) { check_range(p, n); memset((void*)p, v, n); return 0; }
int cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t n, void*) { check_range(d, n); memcpy((void*)d, s, n); return 0; }
int cuMemcpyHtoD_v2(CUdeviceptr d, const void* s, size_t n) { check_range(d, n); memcpy((void*)d, s, n); return 0; }
int cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t n, void*) { check_range(s, n); memcpy(d, (void*)s, n); return 0; }
int cuMemcpyDtoH_v2(void* d, CUdeviceptr s, size_t n) { check_range(s, n); memcpy(d, (void*)s, n); return 0; }
int cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void*) { check_range(s, n); check_range(d, n); memmove((void*)d, (void*)s, n); return 0; }
int cuMemGetInfo_v2(size_t* f, size_t* t) { *f = 70ull << 30; *t = 80ull << 30; return 0; }
static int g_module_dummy;
int cuModuleLoadData(void** m, const void* image) {
    if (memcmp(image, "\x7f" "ELF", 4) != 0) die("module image is not an ELF cubin");
    *m = &g_module_dummy; return 0;
}
int cuModuleUnload(void*) { return 0; }
int cuModuleGetFunction(void** f, void*, const char* name) {
    for (Entry* e = g_entries; e->name; ++e) if (!strcmp(e->name, name)) { *f = e; return 0; }
    return 500;  // CUDA_ERROR_NOT_FOUND
}
int cuGetErrorString(int, const char** s) { *s = "fake error"; return 0; }
int cuGetErrorName(int, const char** s) { *s = "FAKE_ERROR"; return 0; }
int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shmem, void*, void** params, void** extra) {
    Entry* e = (Entry*)f;
    // The block and grid indices are globals: launches from several host threads take turns.
    static std::mutex launch_mu;
    std::lock_guard<std::mutex> one_at_a_time(launch_mu);
    if (extra) die("extra launch params");
    if (gx == 0 || gy == 0 || gz == 0 || bx * by * bz == 0) die("empty launch");
    if (bx * by * bz > 1024) die("more than 1024 threads per block");
    if (shmem > 48 * 1024) die("more than 48 KiB of dynamic shared memory");
    e->check(params);
    gridDim = {gx, gy, gz}; blockDim = {bx, by, bz};
    std::vector<unsigned char> smem(shmem + 1, 0xA5);
    g_dyn_smem = smem.data();
    unsigned nthreads = bx * by * bz;
    for (unsigned z = 0; z < gz; ++z) for (unsigned y = 0; y < gy; ++y) for (unsigned x = 0; x < gx; ++x) {
        blockIdx = {x, y, z};
        std::barrier<> bar(nthreads);
        g_barrier = &bar;
        std::vector<std::thread> ts;
        ts.reserve(nthreads);
        for (unsigned t = 0; t < nthreads; ++t) {
            ts.emplace_back([=] {
                threadIdx = {t % bx, (t / bx) % by, t / (bx * by)};
                e->fn(params);
            });
        }
        for (auto& t : ts) t.join();
    }
    return 0;
}
}
