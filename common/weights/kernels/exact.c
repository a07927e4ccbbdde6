/* Products with weights kept in the narrow form they are exactly representable in (common/weights/exact.py).

   y[M, N] = x[M, K] @ W^T for W [N, K] stored in blocks of 32 weights along K, one of:
     q4: 16 bytes of 4-bit codes per block (byte j: code of weight j in its low nibble, of weight j + 16 in its
         high nibble), a float32 step d and minimum m per block: w = fma(code, d, m) (GGUF's Q4_1);
     q8: 32 signed bytes per block and a float32 step d per block: w = code * d (GGUF's Q8_0);
     bf: the weights' bfloat16 bit patterns: w = bits << 16.
   Each weight is rebuilt in float32 exactly as the dense float32 matrix holds it (code * d is exact: an 11-bit
   step times a code of at most 8 bits), then multiplied and summed in float32; only the order of the sums
   differs from a dense product. Plain C; AVX2 + FMA, or AVX-512, when compiled for a CPU that has them.

   Threads: a product's output rows are split between the calling thread and helper threads of this library's own
   pool (below), not OpenMP's: between a node's passes the helpers sleep, so three nodes on two cores do not take
   turns spinning, but during a pass (`exact_hot(1)` ... `exact_hot(0)`) they spin, so that each of a pass's ~40
   products starts at once instead of after waking a sleeping thread (which cost a 10-layer pass of 8 rows
   ~10 ms instead of ~6 here). */
#include <stdint.h>
#include <stddef.h>
#include <stdatomic.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define EXACT_SIMD 1
#else
#define EXACT_SIMD 0
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RELAX() _mm_pause()
#else
#define RELAX() ((void)0)
#endif

int exact_abi(void) { return 3; }
int exact_simd(void) {  /* the vector width the products were built for, in bits (0: portable C) */
#if EXACT_SIMD && defined(__AVX512F__)
    return 512;
#else
    return EXACT_SIMD ? 256 : 0;
#endif
}

/* ---- the thread pool ----
   One job at a time (callers take `call_lock`; a caller that finds it taken computes alone). A job is `parts` equal
   slices of the output rows; the caller and any helpers claim slices through one atomic word (job sequence, next
   slice, slices), so a helper that wakes late can only claim slices of the job now published, and the caller
   returns once every slice it published is done. */
#define MAX_THREADS 64
#define SPIN_SECONDS 0.1   /* a helper spins at most this long without work, even while the pool is hot */
typedef void (*part_fn)(const void *job, int start, int stop);
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static _Atomic uint64_t job_word;  /* sequence << 32 | next slice << 16 | slices */
static _Atomic int job_done, hot;
static part_fn job_fn;
static const void *job_args;
static int job_rows, helpers;

static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* claim and run slices of the published job until none is left */
static void run_slices(void) {
    uint64_t word = atomic_load(&job_word);
    for (;;) {
        int next = (int)((word >> 16) & 0xFFFF), slices = (int)(word & 0xFFFF);
        if (next >= slices) return;
        if (!atomic_compare_exchange_weak(&job_word, &word, word + (1u << 16))) continue;
        job_fn(job_args, (int)((long)job_rows * next / slices), (int)((long)job_rows * (next + 1) / slices));
        atomic_fetch_add(&job_done, 1);
        word = atomic_load(&job_word);
    }
}

static void *helper(void *unused) {
    (void)unused;
    uint32_t seen = (uint32_t)(atomic_load(&job_word) >> 32);
    for (;;) {
        double idle_since = seconds_now();
        unsigned long spins = 0;
        while ((uint32_t)(atomic_load(&job_word) >> 32) == seen) {
            if (atomic_load(&hot) > 0 && ((++spins & 4095) || seconds_now() - idle_since < SPIN_SECONDS)) {
                RELAX();
                if ((spins & 255) == 0) sched_yield();  /* let other threads of this core run */
                continue;
            }
            pthread_mutex_lock(&sleep_lock);
            if ((uint32_t)(atomic_load(&job_word) >> 32) == seen) pthread_cond_wait(&wake, &sleep_lock);
            pthread_mutex_unlock(&sleep_lock);
            idle_since = seconds_now();
            spins = 0;
        }
        seen = (uint32_t)(atomic_load(&job_word) >> 32);
        run_slices();
    }
    return NULL;
}

static void wake_helpers(void) {
    pthread_mutex_lock(&sleep_lock);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&sleep_lock);
}

/* fn over rows [0, rows) on up to `threads` threads (this one included); fast.c's products use it too */
void exact_run_job(part_fn fn, const void *args, int rows, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > rows) threads = rows;
    if (threads <= 1 || pthread_mutex_trylock(&call_lock) != 0) {
        fn(args, 0, rows);
        return;
    }
    while (helpers < threads - 1) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, helper, NULL) != 0) break;
        pthread_detach(thread);
        helpers++;
    }
    job_fn = fn, job_args = args, job_rows = rows;
    atomic_store(&job_done, 0);
    uint64_t sequence = (atomic_load(&job_word) >> 32) + 1;
    atomic_store(&job_word, (sequence << 32) | (uint64_t)threads);
    if (atomic_load(&hot) <= 0) wake_helpers();
    run_slices();
    while (atomic_load(&job_done) < threads) RELAX();
    pthread_mutex_unlock(&call_lock);
}

/* on > 0: a pass begins (helpers spin between its products); 0: it ended (they sleep) */
void exact_hot(int on) {
    if (on > 0) {
        atomic_fetch_add(&hot, 1);
        wake_helpers();
    } else {
        atomic_fetch_sub(&hot, 1);
    }
}

/* ---- one block of 32 weights as float32 (portable) ---- */
static inline void block_q4(const uint8_t *q, const float *d, const float *m, size_t b, float *w) {
    const uint8_t *c = q + b * 16;
    for (int j = 0; j < 16; j++) {
        w[j] = __builtin_fmaf((float)(c[j] & 15), d[b], m[b]);
        w[j + 16] = __builtin_fmaf((float)(c[j] >> 4), d[b], m[b]);
    }
}
static inline void block_q8(const int8_t *q, const float *d, size_t b, float *w) {
    for (int j = 0; j < 32; j++) w[j] = (float)q[b * 32 + j] * d[b];
}
static inline void block_bf(const uint16_t *q, size_t b, float *w) {
    for (int j = 0; j < 32; j++) {
        union { uint32_t u; float f; } v = { .u = (uint32_t)q[b * 32 + j] << 16 };
        w[j] = v.f;
    }
}

#if EXACT_SIMD && defined(__AVX512F__)
/* AVX-512: a block's 32 weights in two registers of 16 (half the instructions of AVX2's four of 8), each multiply-added
   into a sum of its own (two independent chains a row), the two added lane by lane at the end. Every path
   below (one row, four output rows, many rows) sums a row in the same order, so a row's bits never depend on
   the product's other rows; they differ from an AVX2 build's (another order of the same sums). */
typedef __m512 vec;
#define VZERO() _mm512_setzero_ps()
static inline float hsum(__m512 s) {
    __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
#define LOAD_Q4(b)                                                                                          \
    __m128i bytes = _mm_loadu_si128((const __m128i *)(q + (b) * 16));                                      \
    __m512 vd = _mm512_set1_ps(d[b]), vm = _mm512_set1_ps(m[b]);                                            \
    __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, nib))), vd, vm); \
    __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(                                    \
        _mm_and_si128(_mm_srli_epi16(bytes, 4), nib))), vd, vm);
#define LOAD_Q8(b)                                                                                          \
    const int8_t *c = q + (b) * 32;                                                                         \
    __m512 vd = _mm512_set1_ps(d[b]);                                                                       \
    __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)c))), vd);        \
    __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + 16)))), vd);
#define BF16X(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define LOAD_BF(b)                                                                                          \
    const uint16_t *c = q + (b) * 32;                                                                       \
    __m512 w0 = BF16X(c), w1 = BF16X(c + 16);
/* a += the block's 32 products: two multiply-adds into the sum, lane by lane */
#define ACCUMULATE(a, e, xb) (a = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), a),                               \
                            e = _mm512_fmadd_ps(w1, _mm512_loadu_ps((xb) + 16), e))
#define FINISH(a, e) hsum(_mm512_add_ps(a, e))  /* the two halves' sums, lane by lane, then across */
#define STORE_BLOCK(o) _mm512_storeu_ps(o, w0); _mm512_storeu_ps((o) + 16, w1);
#elif EXACT_SIMD
typedef __m256 vec;
#define VZERO() _mm256_setzero_ps()
static inline float hsum(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
/* the block's 32 weights in four registers */
#define LOAD_Q4(b)                                                                                          \
    __m128i bytes = _mm_loadu_si128((const __m128i *)(q + (b) * 16));                                      \
    __m128i lo = _mm_and_si128(bytes, nib), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib);             \
    __m256 vd = _mm256_set1_ps(d[b]), vm = _mm256_set1_ps(m[b]);                                            \
    __m256 w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), vd, vm);                     \
    __m256 w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), vd, vm);  \
    __m256 w2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), vd, vm);                     \
    __m256 w3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), vd, vm);
#define LOAD_Q8(b)                                                                                          \
    const int8_t *c = q + (b) * 32;                                                                         \
    __m256 vd = _mm256_set1_ps(d[b]);                                                                       \
    __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)c))), vd);        \
    __m256 w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(c + 8)))), vd);  \
    __m256 w2 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(c + 16)))), vd); \
    __m256 w3 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(c + 24)))), vd);
#define BF8(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define LOAD_BF(b)                                                                                          \
    const uint16_t *c = q + (b) * 32;                                                                       \
    __m256 w0 = BF8(c), w1 = BF8(c + 8), w2 = BF8(c + 16), w3 = BF8(c + 24);
#define BLOCK_SUM(xb) _mm256_fmadd_ps(w3, _mm256_loadu_ps((xb) + 24), _mm256_fmadd_ps(w2, _mm256_loadu_ps((xb) + 16), \
                      _mm256_fmadd_ps(w1, _mm256_loadu_ps((xb) + 8), _mm256_mul_ps(w0, _mm256_loadu_ps(xb)))))
#define ACCUMULATE(a, e, xb) (a = _mm256_add_ps(a, BLOCK_SUM(xb)))  /* a += the block's 32 products, summed first */
#define FINISH(a, e) ((void)(e), hsum(a))
#define STORE_BLOCK(o) _mm256_storeu_ps(o, w0); _mm256_storeu_ps((o) + 8, w1); _mm256_storeu_ps((o) + 16, w2); \
                       _mm256_storeu_ps((o) + 24, w3);
#endif

#if EXACT_SIMD
/* one output row n (its blocks start at block index `first`) against a one-row x (ROW_GROUPS takes several). A
   row of x is summed in the same order whatever M is (one block's 32 products, then block after block), so a row's
   result does not depend on the other rows of the product: a session's step gives the same bits alone and batched
   with others. */
#define ROW_DOT(LOAD)                                                                                       \
    {                                                                                                       \
        vec a = VZERO(), e = a;                                                                             \
        for (size_t b = first; b < first + nb; b++) {                                                       \
            LOAD(b)                                                                                         \
            ACCUMULATE(a, e, x + (b - first) * 32);                                                         \
        }                                                                                                   \
        y[n] = FINISH(a, e);                                                                                \
    }
/* several rows of x: groups of 8 (then 4, 2, 1) outside, the slice's output rows inside, so that a group's rows of x
   (8 x K floats: 18 KB for K = 576) stay in the core's first cache while every output row reads them, instead of
   all M rows streaming from the second cache for each output row (~20 % at 16 and 32 rows, the prompts' passes).
   Every group size sums a row as ROW_DOT does: a row's bits do not depend on the others */
#define ROW_GROUPS(LOAD)                                                                                    \
    if (M > 1) {                                                                                            \
        for (int r0 = 0; r0 < M;) {                                                                         \
            const int R = M - r0 >= 8 ? 8 : M - r0 >= 4 ? 4 : M - r0 >= 2 ? 2 : 1;                         \
            for (int n = start; n < stop; n++) {                                                            \
                const size_t first = (size_t)n * nb;                                                        \
                switch (R) {                                                                                \
                    case 8: ROWS_DOT(LOAD, 8) break;                                                        \
                    case 4: ROWS_DOT(LOAD, 4) break;                                                        \
                    case 2: ROWS_DOT(LOAD, 2) break;                                                        \
                    default: ROWS_DOT(LOAD, 1) break;                                                       \
                }                                                                                           \
            }                                                                                               \
            r0 += R;                                                                                        \
        }                                                                                                   \
        return;                                                                                             \
    }
/* rows [r0, r0 + R) of x against output row n, R a constant (the sums stay in registers); every group size sums a
   row in the same order */
#define ROWS_DOT(LOAD, R)                                                                                   \
    {                                                                                                       \
        vec a[R], e[R];                                                                                     \
        for (int r = 0; r < R; r++) a[r] = e[r] = VZERO();                                                  \
        for (size_t b = first; b < first + nb; b++) {                                                       \
            LOAD(b)                                                                                         \
            _Pragma("GCC unroll 8")                                                                         \
            for (int r = 0; r < R; r++)                                                                     \
                ACCUMULATE(a[r], e[r], x + (size_t)(r0 + r) * K + (b - first) * 32);                        \
        }                                                                                                   \
        for (int r = 0; r < R; r++) y[(size_t)(r0 + r) * N + n] = FINISH(a[r], e[r]);                       \
    }
/* one-row products: four output rows at a time, each its own accumulator summed in ROW_DOT's order (the same
   bits), so that four independent chains of additions overlap instead of one waiting on each block's sum: ~2x on
   matrices that do not stay in the core's caches (a span of 30 SmolLM2 layers), where one chain waits on loads */
#define ROWS4_DOT(LOAD)                                                                                     \
    if (M == 1 && n + 4 <= stop) {                                                                          \
        vec a0 = VZERO(), a1 = a0, a2 = a0, a3 = a0, e0 = a0, e1 = a0, e2 = a0, e3 = a0;                    \
        for (size_t j = 0; j < nb; j++) {                                                                   \
            const float *xb = x + j * 32;                                                                   \
            { LOAD(first + j) ACCUMULATE(a0, e0, xb); }                                                     \
            { LOAD(first + nb + j) ACCUMULATE(a1, e1, xb); }                                                \
            { LOAD(first + 2 * nb + j) ACCUMULATE(a2, e2, xb); }                                            \
            { LOAD(first + 3 * nb + j) ACCUMULATE(a3, e3, xb); }                                            \
        }                                                                                                   \
        y[n] = FINISH(a0, e0), y[n + 1] = FINISH(a1, e1), y[n + 2] = FINISH(a2, e2), y[n + 3] = FINISH(a3, e3); \
        n += 3;                                                                                             \
        continue;                                                                                           \
    }
#else
#define ROW_DOT_PORTABLE(BLOCK)                                                                             \
    for (int r = 0; r < M; r++) y[(size_t)r * N + n] = 0.0f;                                                \
    for (size_t b = first; b < first + nb; b++) {                                                           \
        float w[32];                                                                                        \
        BLOCK;                                                                                              \
        for (int r = 0; r < M; r++) {                                                                       \
            const float *xb = x + (size_t)r * K + (b - first) * 32;                                         \
            float s = 0.0f;                                                                                 \
            for (int j = 0; j < 32; j++) s += w[j] * xb[j];                                                 \
            y[(size_t)r * N + n] += s;                                                                      \
        }                                                                                                   \
    }
#endif

typedef struct {
    const float *x;
    int M, K, N;
    const void *q;
    const float *d, *m;
    float *y;
} gemm_job;

static void q4_part(const void *job, int start, int stop) {
    const gemm_job *g = job;
    const float *x = g->x, *d = g->d, *m = g->m;
    const uint8_t *q = g->q;
    const int M = g->M, K = g->K, N = g->N;
    float *y = g->y;
    const size_t nb = K / 32;
#if EXACT_SIMD
    const __m128i nib = _mm_set1_epi8(0x0F);
#endif
#if EXACT_SIMD
    ROW_GROUPS(LOAD_Q4)
#endif
    for (int n = start; n < stop; n++) {
        const size_t first = (size_t)n * nb;
#if EXACT_SIMD
        ROWS4_DOT(LOAD_Q4)
        ROW_DOT(LOAD_Q4)
#else
        ROW_DOT_PORTABLE(block_q4(q, d, m, b, w))
#endif
    }
}

static void q8_part(const void *job, int start, int stop) {
    const gemm_job *g = job;
    const float *x = g->x, *d = g->d;
    const int8_t *q = g->q;
    const int M = g->M, K = g->K, N = g->N;
    float *y = g->y;
    const size_t nb = K / 32;
#if EXACT_SIMD
    ROW_GROUPS(LOAD_Q8)
#endif
    for (int n = start; n < stop; n++) {
        const size_t first = (size_t)n * nb;
#if EXACT_SIMD
        ROWS4_DOT(LOAD_Q8)
        ROW_DOT(LOAD_Q8)
#else
        ROW_DOT_PORTABLE(block_q8(q, d, b, w))
#endif
    }
}

static void bf_part(const void *job, int start, int stop) {
    const gemm_job *g = job;
    const float *x = g->x;
    const uint16_t *q = g->q;
    const int M = g->M, K = g->K, N = g->N;
    float *y = g->y;
    const size_t nb = K / 32;
#if EXACT_SIMD
    ROW_GROUPS(LOAD_BF)
#endif
    for (int n = start; n < stop; n++) {
        const size_t first = (size_t)n * nb;
#if EXACT_SIMD
        ROWS4_DOT(LOAD_BF)
        ROW_DOT(LOAD_BF)
#else
        ROW_DOT_PORTABLE(block_bf(q, b, w))
#endif
    }
}

void q4_gemm(const float *x, int M, int K, const uint8_t *q, const float *d, const float *m, int N, float *y,
             int threads) {
    gemm_job job = {x, M, K, N, q, d, m, y};
    exact_run_job(q4_part, &job, N, threads);
}

void q8_gemm(const float *x, int M, int K, const int8_t *q, const float *d, int N, float *y, int threads) {
    gemm_job job = {x, M, K, N, q, d, NULL, y};
    exact_run_job(q8_part, &job, N, threads);
}

void bf_gemm(const float *x, int M, int K, const uint16_t *q, int N, float *y, int threads) {
    gemm_job job = {x, M, K, N, q, NULL, NULL, y};
    exact_run_job(bf_part, &job, N, threads);
}

/* rows [start, stop) of W as dense float32 [stop - start, K] (for long products and gradients) */
void q4_dense(const uint8_t *q, const float *d, const float *m, int K, int start, int stop, float *w) {
    const size_t nb = K / 32, first = (size_t)start * nb, last = (size_t)stop * nb;
#if EXACT_SIMD
    const __m128i nib = _mm_set1_epi8(0x0F);
    for (size_t b = first; b < last; b++) {
        LOAD_Q4(b)
        float *o = w + (b - first) * 32;
        STORE_BLOCK(o)
    }
#else
    for (size_t b = first; b < last; b++) block_q4(q, d, m, b, w + (b - first) * 32);
#endif
}
void q8_dense(const int8_t *q, const float *d, int K, int start, int stop, float *w) {
    const size_t nb = K / 32, first = (size_t)start * nb, last = (size_t)stop * nb;
#if EXACT_SIMD
    for (size_t b = first; b < last; b++) {
        LOAD_Q8(b)
        float *o = w + (b - first) * 32;
        STORE_BLOCK(o)
    }
#else
    for (size_t b = first; b < last; b++) block_q8(q, d, b, w + (b - first) * 32);
#endif
}
