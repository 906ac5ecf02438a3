/* A stand-in for NCCL (libnccl.so) with the functions NcclComm calls, for ranks that are threads
 * of one process: ranks created with the same unique id form a clique; a collective completes
 * when every rank of the clique has enqueued it, and sums add the ranks' values in rank order
 * (as Lazarus's threads backend does, so results compare bit for bit). It behaves like a
 * non-blocking communicator: creation and collectives return ncclInProgress until complete, and
 * ncclCommGetAsyncError reports progress. It refuses a config that is not NCCL_CONFIG_INITIALIZER
 * with blocking = 0. With STUB_NCCL_LOG set it appends "init <comm>" and "abort <comm>" lines to
 * that file, so a test can check that every communicator is aborted exactly once. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef enum {
    ncclSuccess = 0, ncclUnhandledCudaError = 1, ncclSystemError = 2, ncclInternalError = 3,
    ncclInvalidArgument = 4, ncclInvalidUsage = 5, ncclRemoteError = 6, ncclInProgress = 7
} ncclResult_t;
enum { UINT8 = 1, UINT64 = 5, FLOAT32 = 7, FLOAT64 = 8 };
enum { SUM = 0, MAX = 2, MIN = 3 };
enum { ALL_REDUCE = 1, REDUCE_SCATTER, ALL_GATHER, BROADCAST };
enum { RANKS_MAX = 16 };

typedef struct { char internal[128]; } ncclUniqueId;
/* The leading fields of ncclConfig_t, which every version shares. */
typedef struct { size_t size; unsigned int magic; unsigned int version; int blocking; } config_head;

struct slot { long gen; int kind; const void *send; void *recv; size_t count; int dtype, op, root; };
struct clique {
    char id[128];
    int nranks, joined;
    long done;          /* last completed generation */
    int bad;            /* ranks disagreed about a collective */
    struct slot slots[RANKS_MAX];
    struct clique *next;
};
struct comm { struct clique *q; int rank; long gen; int aborted; };
typedef struct comm *ncclComm_t;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct clique *cliques;
static long ids_made;

static void log_line(const char *what, void *comm) {
    const char *path = getenv("STUB_NCCL_LOG");
    if (!path) return;
    FILE *f = fopen(path, "a");
    if (!f) return;
    fprintf(f, "%s %p\n", what, comm);
    fclose(f);
}

ncclResult_t ncclGetVersion(int *version) { *version = 23000; return ncclSuccess; }

ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
    pthread_mutex_lock(&mu);
    long n = ++ids_made;
    pthread_mutex_unlock(&mu);
    memset(id->internal, 0, sizeof id->internal);
    snprintf(id->internal, sizeof id->internal, "stub-%d-%ld", (int)getpid(), n);
    return ncclSuccess;
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t *out, int nranks, ncclUniqueId id, int rank,
                                    config_head *config) {
    if (!config || config->magic != 0xcafebeef || config->blocking != 0 ||
        config->size < sizeof(config_head) || config->version < 21400)
        return ncclInvalidArgument;
    if (nranks < 1 || nranks > RANKS_MAX || rank < 0 || rank >= nranks) return ncclInvalidArgument;
    pthread_mutex_lock(&mu);
    struct clique *q = cliques;
    while (q && memcmp(q->id, id.internal, sizeof q->id) != 0) q = q->next;
    if (!q) {
        q = calloc(1, sizeof *q);
        memcpy(q->id, id.internal, sizeof q->id);
        q->nranks = nranks;
        q->next = cliques;
        cliques = q;
    }
    if (q->nranks != nranks) {
        pthread_mutex_unlock(&mu);
        return ncclInvalidArgument;
    }
    q->joined++;
    struct comm *c = calloc(1, sizeof *c);
    c->q = q;
    c->rank = rank;
    pthread_mutex_unlock(&mu);
    log_line("init", c);
    *out = c;
    return ncclInProgress;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t c, ncclResult_t *state) {
    if (!c || c->aborted) return ncclInvalidUsage;
    pthread_mutex_lock(&mu);
    if (c->q->bad) *state = ncclInvalidUsage;
    else if (c->q->joined < c->q->nranks || c->gen > c->q->done) *state = ncclInProgress;
    else *state = ncclSuccess;
    pthread_mutex_unlock(&mu);
    return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t c) {
    log_line("abort", c);
    /* Kept, not freed: a second abort then shows in the log instead of corrupting memory. */
    if (c) c->aborted = 1;
    return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t c) { log_line("destroy", c); return ncclSuccess; }

static size_t dtype_bytes(int dtype) {
    switch (dtype) {
    case UINT8: return 1;
    case FLOAT32: return 4;
    case UINT64: case FLOAT64: return 8;
    default: return 0;
    }
}

/* acc = acc (op) value, element i, for one data type. */
static void combine(int dtype, int op, void *acc, const void *value) {
    switch (dtype) {
    case FLOAT32: { float *a = acc; float v = *(const float *)value;
        *a = op == SUM ? *a + v : op == MAX ? (*a > v ? *a : v) : (*a < v ? *a : v); break; }
    case FLOAT64: { double *a = acc; double v = *(const double *)value;
        *a = op == SUM ? *a + v : op == MAX ? (*a > v ? *a : v) : (*a < v ? *a : v); break; }
    case UINT64: { uint64_t *a = acc; uint64_t v = *(const uint64_t *)value;
        *a = op == SUM ? *a + v : op == MAX ? (*a > v ? *a : v) : (*a < v ? *a : v); break; }
    case UINT8: { uint8_t *a = acc; uint8_t v = *(const uint8_t *)value;
        *a = op == SUM ? (uint8_t)(*a + v) : op == MAX ? (*a > v ? *a : v) : (*a < v ? *a : v); break; }
    }
}

/* Element j of the rank-order reduction of every rank's send buffer, into out. */
static void reduce_at(struct clique *q, size_t j, void *out) {
    const struct slot *s0 = &q->slots[0];
    size_t b = dtype_bytes(s0->dtype);
    memcpy(out, (const char *)s0->send + j * b, b);
    for (int r = 1; r < q->nranks; r++)
        combine(s0->dtype, s0->op, out, (const char *)q->slots[r].send + j * b);
}

/* Runs generation `gen` for every rank; called with `mu` held once all ranks have enqueued it.
 * Results go to a temporary buffer first, so in-place collectives read before they write. */
static void perform(struct clique *q) {
    const struct slot *s0 = &q->slots[0];
    int n = q->nranks;
    for (int r = 1; r < n; r++) {
        const struct slot *s = &q->slots[r];
        if (s->kind != s0->kind || s->count != s0->count || s->dtype != s0->dtype ||
            s->op != s0->op || s->root != s0->root) {
            q->bad = 1;
            return;
        }
    }
    size_t b = dtype_bytes(s0->dtype), count = s0->count;
    size_t total = s0->kind == REDUCE_SCATTER || s0->kind == ALL_GATHER ? count * n : count;
    char *tmp = malloc(total * b + 1);
    switch (s0->kind) {
    case ALL_REDUCE:
        for (size_t j = 0; j < count; j++) reduce_at(q, j, tmp + j * b);
        for (int r = 0; r < n; r++) memcpy(q->slots[r].recv, tmp, count * b);
        break;
    case REDUCE_SCATTER:
        for (size_t j = 0; j < total; j++) reduce_at(q, j, tmp + j * b);
        for (int r = 0; r < n; r++) memcpy(q->slots[r].recv, tmp + r * count * b, count * b);
        break;
    case ALL_GATHER:
        for (int r = 0; r < n; r++) memcpy(tmp + r * count * b, q->slots[r].send, count * b);
        for (int r = 0; r < n; r++) memcpy(q->slots[r].recv, tmp, total * b);
        break;
    case BROADCAST:
        memcpy(tmp, q->slots[s0->root].send, count * b);
        for (int r = 0; r < n; r++) memcpy(q->slots[r].recv, tmp, count * b);
        break;
    }
    free(tmp);
}

static ncclResult_t enqueue(ncclComm_t c, int kind, const void *send, void *recv, size_t count,
                            int dtype, int op, int root) {
    if (!c || c->aborted) return ncclInvalidUsage;
    if (dtype_bytes(dtype) == 0) return ncclInvalidArgument;
    pthread_mutex_lock(&mu);
    struct clique *q = c->q;
    c->gen++;
    struct slot s = { c->gen, kind, send, recv, count, dtype, op, root };
    q->slots[c->rank] = s;
    int all = 1;
    for (int r = 0; r < q->nranks; r++) all = all && q->slots[r].gen == c->gen;
    if (all) {
        perform(q);
        q->done = c->gen;
    }
    pthread_mutex_unlock(&mu);
    /* Both answers are allowed of a non-blocking communicator; give both. */
    return all ? ncclSuccess : ncclInProgress;
}

ncclResult_t ncclAllReduce(const void *send, void *recv, size_t count, int dtype, int op,
                           ncclComm_t c, void *stream) {
    (void)stream;
    return enqueue(c, ALL_REDUCE, send, recv, count, dtype, op, 0);
}
ncclResult_t ncclReduceScatter(const void *send, void *recv, size_t count, int dtype, int op,
                               ncclComm_t c, void *stream) {
    (void)stream;
    return enqueue(c, REDUCE_SCATTER, send, recv, count, dtype, op, 0);
}
ncclResult_t ncclAllGather(const void *send, void *recv, size_t count, int dtype, ncclComm_t c,
                           void *stream) {
    (void)stream;
    return enqueue(c, ALL_GATHER, send, recv, count, dtype, SUM, 0);
}
ncclResult_t ncclBroadcast(const void *send, void *recv, size_t count, int dtype, int root,
                           ncclComm_t c, void *stream) {
    (void)stream;
    return enqueue(c, BROADCAST, send, recv, count, dtype, SUM, root);
}

const char *ncclGetErrorString(ncclResult_t result) {
    switch (result) {
    case ncclSuccess: return "no error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    case ncclInProgress: return "operation in progress";
    default: return "stub error";
    }
}
const char *ncclGetLastError(ncclComm_t c) { (void)c; return ""; }
