/* A whole decode pass of LLaMA-style layers in one call (node/model/lean_decode.py): every row one token.

   Per layer, as node/model/lean.py computes it with torch: RMSNorm, the fused q/k/v product, the rotary
   embedding of queries and keys, the keys and values written into each sequence's cache, attention of each
   query head over its sequence's cache (grouped heads share a key/value head), the output product and the
   residual, RMSNorm, the fused gate/up product, silu(gate) * up, the down product and the residual. The four
   products are this library's own (exact.c: q4/q8/bf16 forms rebuilt exactly, or fast.c: llama.cpp's numerics),
   run on the pool's threads; the rest runs on the calling thread. One call replaces ~25 torch operations a
   layer, each of which costs a one-token row more in dispatch than in arithmetic.

   The results equal torch's up to float rounding (the order of sums in the norms and the attention, expf
   against torch's vectorised exp), as the products' do. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DECODE_SIMD 1
#else
#define DECODE_SIMD 0
#endif

void q4_gemm(const float *x, int M, int K, const uint8_t *q, const float *d, const float *m, int N, float *y,
             int threads);
void q8_gemm(const float *x, int M, int K, const int8_t *q, const float *d, int N, float *y, int threads);
void bf_gemm(const float *x, int M, int K, const uint16_t *q, int N, float *y, int threads);
int q4_fast_gemm(const float *x, int M, int K, const uint8_t *q, const float *d, const float *m, int N, float *y,
                 int threads);
int q8_fast_gemm(const float *x, int M, int K, const int8_t *q, const float *d, int N, float *y, int threads);

enum { FORM_Q4 = 0, FORM_Q8 = 1, FORM_BF = 2 };

typedef struct {  /* one matrix [N, K] in an exact form (common/weights/exact.py ExactWeight) */
    int form, fast, N, K;
    const void *codes;
    const float *steps, *mins;
} decode_matrix;

typedef struct {  /* one layer: its norms and its four matrices (q/k/v, o, gate/up, down) */
    const float *input_norm, *post_norm;
    float eps, scaling;
    decode_matrix qkv, o, gate_up, down;
} decode_layer;

typedef struct {  /* one sequence's cache: [layers][...][kv_heads][capacity][head_dim], float32 */
    float *keys, *values;
    long layer_stride;  /* floats between one layer's block and the next's */
    int capacity, past;
} decode_sequence;

static int product(const decode_matrix *w, const float *x, int M, float *y, int threads) {
    if (w->form == FORM_Q4)
        return w->fast ? q4_fast_gemm(x, M, w->K, w->codes, w->steps, w->mins, w->N, y, threads)
                       : (q4_gemm(x, M, w->K, w->codes, w->steps, w->mins, w->N, y, threads), 0);
    if (w->form == FORM_Q8)
        return w->fast ? q8_fast_gemm(x, M, w->K, w->codes, w->steps, w->N, y, threads)
                       : (q8_gemm(x, M, w->K, w->codes, w->steps, w->N, y, threads), 0);
    bf_gemm(x, M, w->K, w->codes, w->N, y, threads);
    return 0;
}

static float dot(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.0f;
#if DECODE_SIMD
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    s = _mm_cvtss_f32(h);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static void axpy(float *y, float a, const float *x, int n) {  /* y += a * x */
    int i = 0;
#if DECODE_SIMD
    __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

/* transformers' RMSNorm in float32: x / sqrt(mean(x^2) + eps), times the weight */
static void rms_norm(const float *x, const float *weight, float eps, int n, float *out) {
    float scale = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (x[i] * scale);
}

/* x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1): signed_sin holds (-sin1, sin2) (lean.py _rotate) */
static void rotate(float *x, const float *cos, const float *signed_sin, int d) {
    int half = d / 2;
    float swapped[512];
    for (int i = 0; i < half; i++) swapped[i] = x[i + half], swapped[i + half] = x[i];
    for (int i = 0; i < d; i++) x[i] = fmaf(swapped[i], signed_sin[i], x[i] * cos[i]);
}

/* one sequence's attention at `layer`: its queries [q_heads * d] over keys/values [0, total) -> out */
static void attend(const decode_sequence *s, int layer, const float *q, int q_heads, int kv_heads, int d,
                   float scaling, int total, float *scores, float *out) {
    int groups = q_heads / kv_heads;
    const float *keys = s->keys + layer * s->layer_stride, *values = s->values + layer * s->layer_stride;
    for (int h = 0; h < q_heads; h++) {
        const float *qh = q + (long)h * d;
        const float *k = keys + (long)(h / groups) * s->capacity * d, *v = values + (long)(h / groups) * s->capacity * d;
        float top = -INFINITY, sum = 0.0f;
        for (int t = 0; t < total; t++) {
            scores[t] = dot(qh, k + (long)t * d, d) * scaling;
            if (scores[t] > top) top = scores[t];
        }
        for (int t = 0; t < total; t++) sum += (scores[t] = expf(scores[t] - top));
        float *o = out + (long)h * d;
        memset(o, 0, sizeof(float) * d);
        for (int t = 0; t < total; t++) axpy(o, scores[t], v + (long)t * d, d);
        float inverse = 1.0f / sum;
        for (int i = 0; i < d; i++) o[i] *= inverse;
    }
}

/* layers [0, count) over x [M, hidden] (in place), row r one token of sequence r at position sequences[r].past:
   its keys and values are written there, and attention covers [0, past]. cos, signed_sin: [M, head_dim].
   0, or -1 where memory ran short (x is then partly updated: the caller's pass fails). */
int decode_pass(const decode_layer *layers, int count, float *x, int M, int hidden, int q_heads, int kv_heads,
                int head_dim, int intermediate, const float *cos, const float *signed_sin,
                const decode_sequence *sequences, int threads) {
    if (head_dim > 512) return -1;
    int q_size = q_heads * head_dim, kv_size = kv_heads * head_dim, qkv_size = q_size + 2 * kv_size;
    int longest = 0;
    for (int r = 0; r < M; r++) if (sequences[r].past + 1 > longest) longest = sequences[r].past + 1;
    size_t floats = (size_t)M * (hidden + qkv_size + q_size + hidden + 2 * (size_t)intermediate + intermediate) + longest;
    float *scratch = malloc(sizeof(float) * floats);
    if (scratch == NULL) return -1;
    float *h = scratch, *qkv = h + (size_t)M * hidden, *attended = qkv + (size_t)M * qkv_size;
    float *delta = attended + (size_t)M * q_size, *gate_up = delta + (size_t)M * hidden;
    float *mid = gate_up + (size_t)M * 2 * intermediate, *scores = mid + (size_t)M * intermediate;
    int failed = 0;
    for (int l = 0; l < count && !failed; l++) {
        const decode_layer *layer = layers + l;
        for (int r = 0; r < M; r++) rms_norm(x + (size_t)r * hidden, layer->input_norm, layer->eps, hidden, h + (size_t)r * hidden);
        if ((failed = product(&layer->qkv, h, M, qkv, threads))) break;
        for (int r = 0; r < M; r++) {
            const decode_sequence *s = sequences + r;
            float *row = qkv + (size_t)r * qkv_size;
            const float *c = cos + (size_t)r * head_dim, *sn = signed_sin + (size_t)r * head_dim;
            for (int head = 0; head < q_heads + kv_heads; head++) rotate(row + (size_t)head * head_dim, c, sn, head_dim);
            float *keys = s->keys + l * s->layer_stride, *values = s->values + l * s->layer_stride;
            for (int g = 0; g < kv_heads; g++) {
                size_t at = ((size_t)g * s->capacity + s->past) * head_dim;
                memcpy(keys + at, row + q_size + (size_t)g * head_dim, sizeof(float) * head_dim);
                memcpy(values + at, row + q_size + kv_size + (size_t)g * head_dim, sizeof(float) * head_dim);
            }
            attend(s, l, row, q_heads, kv_heads, head_dim, layer->scaling, s->past + 1, scores,
                   attended + (size_t)r * q_size);
        }
        if ((failed = product(&layer->o, attended, M, delta, threads))) break;
        for (size_t i = 0; i < (size_t)M * hidden; i++) x[i] += delta[i];
        for (int r = 0; r < M; r++) rms_norm(x + (size_t)r * hidden, layer->post_norm, layer->eps, hidden, h + (size_t)r * hidden);
        if ((failed = product(&layer->gate_up, h, M, gate_up, threads))) break;
        for (int r = 0; r < M; r++) {
            const float *gate = gate_up + (size_t)r * 2 * intermediate, *up = gate + intermediate;
            float *out = mid + (size_t)r * intermediate;
            for (int i = 0; i < intermediate; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
        }
        if ((failed = product(&layer->down, mid, M, delta, threads))) break;
        for (size_t i = 0; i < (size_t)M * hidden; i++) x[i] += delta[i];
    }
    free(scratch);
    return failed ? -1 : 0;
}
