/* A stand-in for the CUDA driver (libcuda.so) with the functions cudarc calls for NcclComm, so
 * that its whole path runs on a machine without a GPU. Four "devices"; device memory is host
 * memory; every stream operation runs when it is enqueued, so streams and events are always
 * complete. Built by comm/tests/it/nccl.rs with the system C compiler. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult; /* 0 = CUDA_SUCCESS */
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void *CUcontext;
typedef void *CUstream;
typedef void *CUevent;

enum { STUB_DEVICES = 4, CUDA_ERROR_INVALID_VALUE = 1, CUDA_ERROR_INVALID_DEVICE = 101 };

static int contexts[STUB_DEVICES];
static __thread CUcontext current;

CUresult cuInit(unsigned int flags) { (void)flags; return 0; }
CUresult cuDeviceGetCount(int *count) { *count = STUB_DEVICES; return 0; }
CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    if (ordinal < 0 || ordinal >= STUB_DEVICES) return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return 0;
}
/* Every attribute reads 0; in particular no memory pools, so cudarc allocates synchronously. */
CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
    (void)attribute; (void)device;
    *value = 0;
    return 0;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice device) {
    if (device < 0 || device >= STUB_DEVICES) return CUDA_ERROR_INVALID_DEVICE;
    *ctx = &contexts[device];
    return 0;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) { (void)device; return 0; }
CUresult cuCtxGetCurrent(CUcontext *ctx) { *ctx = current; return 0; }
CUresult cuCtxSetCurrent(CUcontext ctx) { current = ctx; return 0; }
CUresult cuCtxSynchronize(void) { return 0; }

CUresult cuStreamCreate(CUstream *stream, unsigned int flags) {
    (void)flags;
    *stream = malloc(1);
    return *stream ? 0 : CUDA_ERROR_INVALID_VALUE;
}
CUresult cuStreamDestroy_v2(CUstream stream) { free(stream); return 0; }
CUresult cuStreamQuery(CUstream stream) { (void)stream; return 0; }
CUresult cuStreamSynchronize(CUstream stream) { (void)stream; return 0; }
CUresult cuStreamWaitEvent(CUstream stream, CUevent event, unsigned int flags) {
    (void)stream; (void)event; (void)flags;
    return 0;
}

CUresult cuEventCreate(CUevent *event, unsigned int flags) {
    (void)flags;
    *event = malloc(1);
    return *event ? 0 : CUDA_ERROR_INVALID_VALUE;
}
CUresult cuEventDestroy_v2(CUevent event) { free(event); return 0; }
CUresult cuEventRecord(CUevent event, CUstream stream) { (void)event; (void)stream; return 0; }
CUresult cuEventQuery(CUevent event) { (void)event; return 0; }
CUresult cuEventSynchronize(CUevent event) { (void)event; return 0; }

CUresult cuMemAlloc_v2(CUdeviceptr *ptr, size_t bytes) {
    void *p = calloc(bytes ? bytes : 1, 1);
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    *ptr = (CUdeviceptr)(uintptr_t)p;
    return 0;
}
CUresult cuMemFree_v2(CUdeviceptr ptr) { free((void *)(uintptr_t)ptr); return 0; }
CUresult cuMemAllocAsync(CUdeviceptr *ptr, size_t bytes, CUstream stream) {
    (void)stream;
    return cuMemAlloc_v2(ptr, bytes);
}
CUresult cuMemFreeAsync(CUdeviceptr ptr, CUstream stream) { (void)stream; return cuMemFree_v2(ptr); }
CUresult cuMemsetD8Async(CUdeviceptr ptr, unsigned char value, size_t n, CUstream stream) {
    (void)stream;
    memset((void *)(uintptr_t)ptr, value, n);
    return 0;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream stream) {
    (void)stream;
    memcpy((void *)(uintptr_t)dst, src, n);
    return 0;
}
CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream stream) {
    (void)stream;
    memcpy(dst, (const void *)(uintptr_t)src, n);
    return 0;
}

CUresult cuGetErrorString(CUresult error, const char **text) {
    (void)error;
    *text = "stub CUDA error";
    return 0;
}
CUresult cuGetErrorName(CUresult error, const char **text) {
    (void)error;
    *text = "STUB_CUDA_ERROR";
    return 0;
}
