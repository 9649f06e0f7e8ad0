/* Paged-attention decode on the CPU: one query token per sequence attends over its context read straight
 * from the paged KV cache (no gathered copy). Float32; the layout and semantics are those of the Triton
 * kernel (paged_attention.py): cache rows [num_slots, kv_heads, head_dim], slot = table[p / block] * block +
 * p % block, query head h reads KV head h / (heads / kv_heads), a sliding window keeps the last `window`
 * keys, a soft-cap maps each score to cap * tanh(score / cap). window <= 0 or softcap <= 0: none.
 * One (sequence, KV head) per task: its K/V rows are read once for every query head of its group. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline const float *row(const float *cache, const int64_t *table, int64_t pos, int64_t block,
                               int64_t kv_heads, int64_t kv_head, int64_t dim) {
    return cache + ((table[pos / block] * block + pos % block) * kv_heads + kv_head) * dim;
}

/* scores[g][i] = scale * q_g . k(first + i), soft-capped. */
static void score(const float *q, const float *k_cache, const int64_t *table, int64_t first, int64_t n,
                  int64_t group, int64_t block, int64_t kv_heads, int64_t kv_head, int64_t dim, float scale,
                  float softcap, float *scores) {
    for (int64_t i = 0; i < n; i++) {
        const float *k = row(k_cache, table, first + i, block, kv_heads, kv_head, dim);
        for (int64_t g = 0; g < group; g++) {
            const float *qg = q + g * dim;
            float s = 0.f;
            #pragma omp simd reduction(+:s)
            for (int64_t d = 0; d < dim; d++) s += qg[d] * k[d];
            s *= scale;
            scores[g * n + i] = softcap > 0.f ? tanhf(s / softcap) * softcap : s;
        }
    }
}

/* scores[i] -> exp(scores[i] - max) / sum: softmax in place. */
static void softmax(float *scores, int64_t n) {
    float top = -INFINITY, sum = 0.f;
    for (int64_t i = 0; i < n; i++) top = scores[i] > top ? scores[i] : top;
    for (int64_t i = 0; i < n; i++) sum += (scores[i] = expf(scores[i] - top));
    for (int64_t i = 0; i < n; i++) scores[i] /= sum;
}

int paged_decode(const float *q, const float *k_cache, const float *v_cache, const int64_t *tables,
                 const int64_t *context_lens, int64_t batch, int64_t width, int64_t heads, int64_t kv_heads,
                 int64_t dim, int64_t block, float scale, int64_t window, float softcap, int num_threads,
                 float *out) {
    const int64_t group = heads / kv_heads;
    int failed = 0;
    #pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t kv_head = 0; kv_head < kv_heads; kv_head++) {
            const int64_t len = context_lens[b];
            const int64_t first = window > 0 && len > window ? len - window : 0, n = len - first;
            const int64_t *table = tables + b * width;
            const int64_t head = b * heads + kv_head * group;  /* the group's first query head, batch-flat */
            float *scores = malloc(sizeof(float) * group * n);
            if (scores == NULL) {
                #pragma omp atomic write
                failed = 1;
                continue;
            }
            score(q + head * dim, k_cache, table, first, n, group, block, kv_heads, kv_head, dim, scale, softcap,
                  scores);
            for (int64_t g = 0; g < group; g++) {
                float *p = scores + g * n, *o = out + (head + g) * dim;
                softmax(p, n);
                memset(o, 0, sizeof(float) * dim);
                for (int64_t i = 0; i < n; i++) {
                    const float *v = row(v_cache, table, first + i, block, kv_heads, kv_head, dim);
                    const float w = p[i];
                    #pragma omp simd
                    for (int64_t d = 0; d < dim; d++) o[d] += w * v[d];
                }
            }
            free(scores);
        }
    }
    return failed;
}
