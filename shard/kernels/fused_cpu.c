/* Element-wise decoder ops fused into one pass each, for CPU float32 (shard/kernels/cpu.py): torch runs each
 * as several ops, each a pass over the activations plus its dispatch, which at decode batch sizes costs more
 * than the arithmetic. Built with -ffp-contract=off, so that products and sums round as torch's unfused ops do:
 * the rotation is bit-identical to apply_rotary; the norm differs only in the order it sums the squares. */
#include <math.h>
#include <stdint.h>

#define PARALLEL_FROM 16384 /* elements: below this a second thread costs more than it saves */

/* out[r] = w * (x[r] * 1 / sqrt(mean(x[r]^2) + eps)) over rows of n floats, x's rows `stride` floats apart:
 * transformers' RMSNorm in float32. */
void rms_norm(const float *x, int64_t rows, int64_t n, int64_t stride, const float *w, float eps, float *out,
              int num_threads) {
    #pragma omp parallel for num_threads(num_threads) if (rows * n >= PARALLEL_FROM)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict xr = x + r * stride;
        float *restrict o = out + r * n;
        float squares = 0.f;
        #pragma omp simd reduction(+:squares)
        for (int64_t i = 0; i < n; i++) squares += xr[i] * xr[i];
        const float inv = 1.f / sqrtf(squares / (float)n + eps);
        #pragma omp simd
        for (int64_t i = 0; i < n; i++) o[i] = w[i] * (xr[i] * inv);
    }
}

/* x [tokens, heads, dim], heads contiguous and token rows `stride` floats apart -> out, contiguous: the first
 * `rot` features of each head rotated in transformers' rotate_half form (x * cos + rotate_half(x) * sin), the
 * rest copied. cos, sin: [tokens, rot]. */
void rotary(const float *x, int64_t tokens, int64_t heads, int64_t dim, int64_t stride, const float *cos_,
            const float *sin_, int64_t rot, float *out, int num_threads) {
    const int64_t half = rot / 2;
    #pragma omp parallel for num_threads(num_threads) if (tokens * heads * dim >= PARALLEL_FROM)
    for (int64_t t = 0; t < tokens; t++) {
        const float *restrict c = cos_ + t * rot, *restrict s = sin_ + t * rot;
        for (int64_t h = 0; h < heads; h++) {
            const float *restrict xh = x + t * stride + h * dim;
            float *restrict o = out + (t * heads + h) * dim;
            #pragma omp simd
            for (int64_t i = 0; i < half; i++) o[i] = xh[i] * c[i] + -xh[i + half] * s[i];
            #pragma omp simd
            for (int64_t i = half; i < rot; i++) o[i] = xh[i] * c[i] + xh[i - half] * s[i];
            for (int64_t i = rot; i < dim; i++) o[i] = xh[i];
        }
    }
}

/* e^x, x clamped to [-87.3, 88.3] (the result stays a normal float): Cody-Waite reduction by ln 2 and Cephes'
 * degree-6 polynomial, within ~1 ulp. Plain arithmetic, so that the loops calling it vectorize: glibc's expf
 * does not without -ffast-math. */
static inline float exp_f32(float x) {
    x = x < -87.3f ? -87.3f : x > 88.3f ? 88.3f : x;
    const float n = (x * 1.44269504f + 12582912.f) - 12582912.f; /* rounded to an integer: 1.5 * 2^23 */
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.f;
    const union { int32_t bits; float value; } scale = {.bits = ((int32_t)n + 127) << 23};  /* 2^n */
    return p * scale.value;
}

/* out[r] = silu(x[r, :n]) * x[r, n:2n] over rows of x `stride` floats apart: the MLP's act(gate) * up on the
 * fused gate_up output, silu(g) = g / (1 + e^-g) as torch computes it. */
void silu_mul(const float *x, int64_t rows, int64_t n, int64_t stride, float *out, int num_threads) {
    #pragma omp parallel for num_threads(num_threads) if (rows * n >= PARALLEL_FROM)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict g = x + r * stride, *restrict u = g + n;
        float *restrict o = out + r * n;
        #pragma omp simd
        for (int64_t i = 0; i < n; i++) o[i] = g[i] / (1.f + exp_f32(-g[i])) * u[i];
    }
}
