/* Products in llama.cpp's own numerics, for nodes run with `--numerics fast` (common/weights/exact.py).

   The weights are the exact forms' blocks (exact.c: q4 = 4-bit codes with a float32 step and minimum per block of
   32, GGUF's Q4_1; q8 = signed 8-bit codes with a float32 step, GGUF's Q8_0). Unlike exact.c, the activations are
   not kept in float32: each row of x is cut into blocks of 32 and each block quantised to 8 bits, as llama.cpp's
   Q8_1 does (step dx = max|x| / 127, codes round(x / dx), and sx = dx * the sum of the codes). A block's product is
   then an integer dot product of the codes (AVX2: `_mm256_maddubs_epi16`, as ggml's; VNNI's vpdpbusd where the CPU
   has it, two q4 blocks per instruction with AVX-512) and one float multiply-add:
       q4: d * dx * sum(code * xcode) + m * sx        q8: d * dx * sum(code * xcode)
   so results differ from the exact product by the activations' rounding (about 0.4 % of a block's largest value
   per value), not only by the order of the sums. The steps stay float32 (llama.cpp rounds dx and sx to float16).

   Threads: the output rows are split over exact.c's pool (`exact_run_job`), as the exact products are. Each output
   is summed by one thread in one order, and a row of x is quantised on its own, so a row's result does not depend
   on the other rows of the product nor on the split. */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FAST_SIMD 1
#else
#define FAST_SIMD 0
#endif

typedef void (*part_fn)(const void *job, int start, int stop);
void exact_run_job(part_fn fn, const void *args, int rows, int threads);

#define XTILE 32  /* rows of x whose codes stay in cache while every output row of a slice is computed */

/* x [M, K] -> codes [M, K] and per block of 32 a step d and sx = d * sum(codes) ([M, K / 32] each) */
void q8_quantize(const float *x, int M, int K, int8_t *q, float *d, float *s) {
    const size_t blocks = (size_t)M * (K / 32);
    for (size_t b = 0; b < blocks; b++) {
        const float *xb = x + b * 32;
        int8_t *qb = q + b * 32;
#if FAST_SIMD
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float top = _mm_cvtss_f32(h), step = top / 127.0f;
        const __m256 inv = _mm256_set1_ps(step != 0.0f ? 1.0f / step : 0.0f);
        __m256i c[4];
        for (int i = 0; i < 4; i++)
            c[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i total = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
        packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)qb, packed);
        d[b] = step;
        s[b] = step * (float)_mm_cvtsi128_si32(t);
#else
        float top = 0.0f;
        for (int j = 0; j < 32; j++) {
            const float a = xb[j] < 0 ? -xb[j] : xb[j];
            top = a > top ? a : top;
        }
        const float step = top / 127.0f, inv = step != 0.0f ? 1.0f / step : 0.0f;
        int total = 0;
        for (int j = 0; j < 32; j++) {
            const int code = (int)__builtin_nearbyintf(xb[j] * inv);  /* to nearest, ties to even: as _mm256_round_ps */
            qb[j] = (int8_t)code;
            total += code;
        }
        d[b] = step;
        s[b] = step * (float)total;
#endif
    }
}

typedef struct {
    const int8_t *xq;
    const float *xd, *xs;
    int M, K, N;
    const void *q;
    const float *d, *m;
    float *y;
} fast_job;

#if FAST_SIMD
static inline float hsum8(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
/* sum over pairs of u (unsigned bytes) * s (signed bytes), as 8 floats (each the sum of 4 products: exact) */
static inline __m256 dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    /* one instruction (VNNI), the same sums: maddubs' 16-bit pair sums never saturate here (|u| <= 128, |s| <= 127) */
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s));
#else
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
/* the 32 codes of a q4 block, in weight order (low nibbles are weights 0-15, high nibbles 16-31) */
static inline __m256i q4_codes(const uint8_t *c) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)c);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), _mm256_set1_epi8(0x0F));
}
#endif

#if FAST_SIMD && defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FAST_512 1
static inline float hsum16(__m512 s) {
    __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
    return hsum8(h8);
}
/* the 64 codes of two q4 blocks in weight order: block b's 32 (low nibbles, then high), then block b + 1's */
static inline __m512i q4_codes2(const uint8_t *c) {
    const __m256i bytes = _mm256_loadu_si256((const __m256i *)c), nib = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(bytes, nib), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nib);
    /* [lo b, lo b+1, hi b, hi b+1] (128 bits each) -> [lo b, hi b, lo b+1, hi b+1] */
    return _mm512_shuffle_i64x2(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1),
                                _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), _MM_SHUFFLE(3, 1, 2, 0));
}
/* AVX-512 with VNNI: two blocks per register (one vpdpbusd for 64 products), each lane scaled by its block's
   d * dx; the minimums' part m * sx as a dot product of its own, 16 blocks at a time. The same order for every R */
static inline __attribute__((always_inline)) void q4_rows(const fast_job *g, int n, int r, const int R) {
    const size_t nb = g->K / 32;
    const uint8_t *q = (const uint8_t *)g->q + (size_t)n * nb * 16;
    const float *d = g->d + (size_t)n * nb, *m = g->m + (size_t)n * nb;
    const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512 acc[4];
    __m256 tail[4];
    for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps(), tail[i] = _mm256_setzero_ps();
    size_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const __m512i w = q4_codes2(q + b * 16);
        const __m128 dw = _mm_castpd_ps(_mm_load_sd((const double *)(d + b)));
        for (int i = 0; i < R; i++) {
            const size_t xb = (size_t)(r + i) * nb + b;
            const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(g->xq + xb * 32));
            const __m128 scale = _mm_mul_ps(dw, _mm_castpd_ps(_mm_load_sd((const double *)(g->xd + xb))));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(scale)),
                                     acc[i]);
        }
    }
    if (b < nb) {  /* an odd count of blocks: the last one alone */
        const __m256i w = q4_codes(q + b * 16);
        for (int i = 0; i < R; i++) {
            const size_t xb = (size_t)(r + i) * nb + b;
            const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w,
                                                    _mm256_loadu_si256((const __m256i *)(g->xq + xb * 32)));
            tail[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d[b] * g->xd[xb]));
        }
    }
    for (int i = 0; i < R; i++) {
        const float *xs = g->xs + (size_t)(r + i) * nb;
        __m512 mins = _mm512_setzero_ps();
        for (size_t j = 0; j < nb; j += 16) {
            const __mmask16 take = nb - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nb - j)) - 1);
            mins = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(take, m + j), _mm512_maskz_loadu_ps(take, xs + j), mins);
        }
        g->y[(size_t)(r + i) * g->N + n] = (hsum16(acc[i]) + hsum8(tail[i])) + hsum16(mins);
    }
}
#else
/* output row n against rows [r, r + R) of x; R is a constant at each call (1-4), so the sums stay in registers */
static inline __attribute__((always_inline)) void q4_rows(const fast_job *g, int n, int r, const int R) {
    const size_t nb = g->K / 32;
    const uint8_t *q = (const uint8_t *)g->q + (size_t)n * nb * 16;
    const float *d = g->d + (size_t)n * nb, *m = g->m + (size_t)n * nb;
    float mins[4] = {0, 0, 0, 0};
#if FAST_SIMD
    /* even and odd blocks on two chains of sums (twice the multiply-adds in flight), in this order for every R */
    __m256 even[4], odd[4];
    float odd_mins[4] = {0, 0, 0, 0};
    for (int i = 0; i < R; i++) even[i] = odd[i] = _mm256_setzero_ps();
    size_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const __m256i w0 = q4_codes(q + b * 16), w1 = q4_codes(q + b * 16 + 16);
        for (int i = 0; i < R; i++) {
            const size_t xb = (size_t)(r + i) * nb + b;
            const int8_t *x = g->xq + xb * 32;
            even[i] = _mm256_fmadd_ps(dot_u8s8(w0, _mm256_loadu_si256((const __m256i *)x)),
                                      _mm256_set1_ps(d[b] * g->xd[xb]), even[i]);
            odd[i] = _mm256_fmadd_ps(dot_u8s8(w1, _mm256_loadu_si256((const __m256i *)(x + 32))),
                                     _mm256_set1_ps(d[b + 1] * g->xd[xb + 1]), odd[i]);
            mins[i] += m[b] * g->xs[xb];
            odd_mins[i] += m[b + 1] * g->xs[xb + 1];
        }
    }
    if (b < nb) {  /* an odd count of blocks: the last on the even chain */
        const __m256i w = q4_codes(q + b * 16);
        for (int i = 0; i < R; i++) {
            const size_t xb = (size_t)(r + i) * nb + b;
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(g->xq + xb * 32));
            even[i] = _mm256_fmadd_ps(dot_u8s8(w, xv), _mm256_set1_ps(d[b] * g->xd[xb]), even[i]);
            mins[i] += m[b] * g->xs[xb];
        }
    }
    for (int i = 0; i < R; i++)
        g->y[(size_t)(r + i) * g->N + n] = hsum8(_mm256_add_ps(even[i], odd[i])) + (mins[i] + odd_mins[i]);
#else
    float acc[4] = {0, 0, 0, 0};
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *c = q + b * 16;
        for (int i = 0; i < R; i++) {
            const size_t xb = (size_t)(r + i) * nb + b;
            const int8_t *x = g->xq + xb * 32;
            int total = 0;
            for (int j = 0; j < 16; j++) total += (c[j] & 15) * x[j] + (c[j] >> 4) * x[j + 16];
            acc[i] += (d[b] * g->xd[xb]) * (float)total;
            mins[i] += m[b] * g->xs[xb];
        }
    }
    for (int i = 0; i < R; i++) g->y[(size_t)(r + i) * g->N + n] = acc[i] + mins[i];
#endif
}

#endif

static inline __attribute__((always_inline)) void q8_rows(const fast_job *g, int n, int r, const int R) {
    const size_t nb = g->K / 32;
    const int8_t *q = (const int8_t *)g->q + (size_t)n * nb * 32;
    const float *d = g->d + (size_t)n * nb;
#if FAST_SIMD
    __m256 acc[4];
    for (int i = 0; i < R; i++) acc[i] = _mm256_setzero_ps();
    for (size_t b = 0; b < nb; b++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(q + b * 32));
        const __m256i magnitude = _mm256_sign_epi8(w, w);  /* |w| as unsigned bytes; x takes w's sign instead */
        for (int i = 0; i < R; i++) {
            const size_t xb = (size_t)(r + i) * nb + b;
            const __m256i xv = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(g->xq + xb * 32)), w);
            acc[i] = _mm256_fmadd_ps(dot_u8s8(magnitude, xv), _mm256_set1_ps(d[b] * g->xd[xb]), acc[i]);
        }
    }
    for (int i = 0; i < R; i++) g->y[(size_t)(r + i) * g->N + n] = hsum8(acc[i]);
#else
    float acc[4] = {0, 0, 0, 0};
    for (size_t b = 0; b < nb; b++) {
        const int8_t *c = q + b * 32;
        for (int i = 0; i < R; i++) {
            const size_t xb = (size_t)(r + i) * nb + b;
            const int8_t *x = g->xq + xb * 32;
            int total = 0;
            for (int j = 0; j < 32; j++) total += c[j] * x[j];
            acc[i] += (d[b] * g->xd[xb]) * (float)total;
        }
    }
    for (int i = 0; i < R; i++) g->y[(size_t)(r + i) * g->N + n] = acc[i];
#endif
}

#define FAST_PART(NAME, ROWS)                                                                              \
    static void NAME(const void *job, int start, int stop) {                                               \
        const fast_job *g = job;                                                                           \
        for (int r0 = 0; r0 < g->M; r0 += XTILE) {                                                         \
            const int r1 = g->M - r0 < XTILE ? g->M : r0 + XTILE;                                          \
            for (int n = start; n < stop; n++) {                                                           \
                int r = r0;                                                                                \
                for (; r + 4 <= r1; r += 4) ROWS(g, n, r, 4);                                              \
                switch (r1 - r) {                                                                          \
                    case 3: ROWS(g, n, r, 3); break;                                                       \
                    case 2: ROWS(g, n, r, 2); break;                                                       \
                    case 1: ROWS(g, n, r, 1); break;                                                       \
                    default: break;                                                                        \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
    }
FAST_PART(q4_fast_part, q4_rows)
FAST_PART(q8_fast_part, q8_rows)

/* y [M, N] = x [M, K] @ W^T with x quantised to 8-bit blocks first; 0, or -1 when memory for the codes is short */
static int fast_gemm(part_fn part, const float *x, int M, int K, const void *q, const float *d, const float *m, int N,
                     float *y, int threads) {
    const size_t blocks = (size_t)M * (K / 32);
    int8_t *xq = malloc(blocks * 32 + 2 * blocks * sizeof(float));
    if (xq == NULL) return -1;
    float *xd = (float *)(xq + blocks * 32), *xs = xd + blocks;
    q8_quantize(x, M, K, xq, xd, xs);
    fast_job job = {xq, xd, xs, M, K, N, q, d, m, y};
    exact_run_job(part, &job, N, threads);
    free(xq);
    return 0;
}

int fast_simd(void) { return FAST_SIMD; }

int q4_fast_gemm(const float *x, int M, int K, const uint8_t *q, const float *d, const float *m, int N, float *y,
                 int threads) {
    return fast_gemm(q4_fast_part, x, M, K, q, d, m, N, y, threads);
}

int q8_fast_gemm(const float *x, int M, int K, const int8_t *q, const float *d, int N, float *y, int threads) {
    return fast_gemm(q8_fast_part, x, M, K, q, d, NULL, N, y, threads);
}
