// A stand-in libcublasLt.so for the CUDA backend's tests on a machine without a GPU:
// cublasLtMatmul computed naively on the host (column-major, BLAS semantics, bias epilogue),
// validating attribute sizes, layouts and declared alignments. Built by scripts/cuda-emu.sh.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
static void die(const char* what) { fprintf(stderr, "FAKE CUBLASLT: %s\n", what); abort(); }
struct Desc { int compute, scale; int transa = 0, transb = 0; unsigned epilogue = 1; const void* bias = nullptr; };
struct Layout { int type; uint64_t rows, cols; int64_t ld; };
struct Pref { uint64_t ws = 0; uint32_t align[4] = {256, 256, 256, 256}; };
struct Algo { uint64_t data[8]; };
struct Heur { Algo algo; size_t ws; int state; float waves; int reserved[4]; };
static float ld_val(int type, const void* p, size_t i) {
    if (type == 0) return ((const float*)p)[i];
    if (type == 14) { uint16_t b = ((const uint16_t*)p)[i]; uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
    die("unknown data type"); return 0;
}
static void st_val(int type, void* p, size_t i, float v) {
    if (type == 0) { ((float*)p)[i] = v; return; }
    if (type == 14) {
        uint32_t u; memcpy(&u, &v, 4);
        uint16_t b;
        if ((u & 0x7fffffffu) > 0x7f800000u) b = (u >> 16) | 0x40; else b = (u + 0x7fff + ((u >> 16) & 1)) >> 16;
        ((uint16_t*)p)[i] = b; return;
    }
    die("unknown data type");
}
extern "C" {
int cublasLtCreate(void** h) { static int x; *h = &x; return 0; }
int cublasLtDestroy(void*) { return 0; }
int cublasLtMatmulDescCreate(Desc** d, int compute, int scale) {
    if (compute != 68) die("compute type is not CUBLAS_COMPUTE_32F");
    if (scale != 0) die("scale type is not CUDA_R_32F");
    *d = new Desc{compute, scale}; return 0;
}
int cublasLtMatmulDescDestroy(Desc* d) { delete d; return 0; }
int cublasLtMatmulDescSetAttribute(Desc* d, int attr, const void* buf, size_t size) {
    switch (attr) {
        case 3: if (size != 4) die("TRANSA size"); memcpy(&d->transa, buf, 4); break;
        case 4: if (size != 4) die("TRANSB size"); memcpy(&d->transb, buf, 4); break;
        case 7: if (size != 4) die("EPILOGUE size"); memcpy(&d->epilogue, buf, 4); break;
        case 8: if (size != 8) die("BIAS_POINTER size"); memcpy(&d->bias, buf, 8); break;
        default: die("unexpected desc attribute");
    }
    if (d->transa > 1 || d->transb > 1) die("bad transpose value");
    return 0;
}
int cublasLtMatrixLayoutCreate(Layout** l, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    if (ld < (int64_t)rows) die("ld < rows");
    *l = new Layout{type, rows, cols, ld}; return 0;
}
int cublasLtMatrixLayoutDestroy(Layout* l) { delete l; return 0; }
int cublasLtMatmulPreferenceCreate(Pref** p) { *p = new Pref; return 0; }
int cublasLtMatmulPreferenceDestroy(Pref* p) { delete p; return 0; }
int cublasLtMatmulPreferenceSetAttribute(Pref* p, int attr, const void* buf, size_t size) {
    if (attr == 1) { if (size != 8) die("workspace size attr"); memcpy(&p->ws, buf, 8); return 0; }
    if (attr >= 5 && attr <= 8) { if (size != 4) die("alignment attr size"); memcpy(&p->align[attr - 5], buf, 4); return 0; }
    die("unexpected pref attribute"); return 1;
}
static void check_shapes(Desc* d, Layout* a, Layout* b, Layout* c, Layout* dd) {
    if (c->rows != dd->rows || c->cols != dd->cols || c->ld != dd->ld) die("C and D layouts differ");
    uint64_t m = dd->rows, n = dd->cols;
    uint64_t am = d->transa ? a->cols : a->rows, ak = d->transa ? a->rows : a->cols;
    uint64_t bk = d->transb ? b->cols : b->rows, bn = d->transb ? b->rows : b->cols;
    if (am != m || bn != n || ak != bk) die("inconsistent GEMM shapes");
    if (a->type != b->type || a->type != dd->type) die("mixed data types");
}
int cublasLtMatmulAlgoGetHeuristic(void*, Desc* d, Layout* a, Layout* b, Layout* c, Layout* dd, Pref* p, int req, Heur* out, int* count) {
    if (req < 1) die("requested no algorithm");
    check_shapes(d, a, b, c, dd);
    if (p->ws == 0) die("no workspace");
    memset(out, 0, sizeof(Heur));
    for (int i = 0; i < 4; ++i) out->algo.data[i] = p->align[i];
    out->ws = 0; out->state = 0; *count = 1; return 0;
}
int cublasLtMatmul(void*, Desc* d, const void* alpha, const void* A, Layout* a, const void* B, Layout* b,
                   const void* beta, const void* C, Layout* c, void* D, Layout* dd, const Algo* algo,
                   void* ws, size_t wss, void* stream) {
    check_shapes(d, a, b, c, dd);
    if (C != D) die("C is not D");
    const void* ptrs[4] = {A, B, C, D};
    for (int i = 0; i < 4; ++i) if ((uintptr_t)ptrs[i] % algo->data[i]) die("operand less aligned than declared");
    if (d->epilogue != 1 && d->epilogue != 4) die("unexpected epilogue");
    if (d->epilogue == 4 && !d->bias) die("bias epilogue without pointer");
    if (!ws || !wss) die("no workspace");
    float al, be; memcpy(&al, alpha, 4); memcpy(&be, beta, 4);
    uint64_t m = dd->rows, n = dd->cols, k = d->transa ? a->rows : a->cols;
    for (uint64_t j = 0; j < n; ++j) for (uint64_t i = 0; i < m; ++i) {
        double acc = 0;
        for (uint64_t l = 0; l < k; ++l) {
            size_t ai = d->transa ? l + i * a->ld : i + l * a->ld;
            size_t bi = d->transb ? j + l * b->ld : l + j * b->ld;
            acc += (double)ld_val(a->type, A, ai) * ld_val(b->type, B, bi);
        }
        size_t di = i + j * dd->ld;
        float v = al * (float)acc;
        if (be != 0.0f) v += be * ld_val(dd->type, D, di);
        if (d->epilogue == 4) v += ld_val(dd->type, d->bias, i);
        st_val(dd->type, D, di, v);
    }
    return 0;
}
}
