/*
 * Multi-tenant low-bit GEMM for CPUs: one pass over the shared integers for a whole mixed batch.
 *
 * Semantics: Y[r, n] = sum_g S[slot[r], n, g] * sum_{k in g} X[r, k] * (Q[n, k] - Z[n, g])  (+ bias[n])
 *
 * Why a kernel of our own: PyTorch's CPU int4 matmul takes one (scale, zero) set for the whole call, so a
 * batch whose rows use different tenants' group-wise scales needs one call (one pass over the weights) per
 * tenant. Here the tenant only enters the per-group epilogue: each weight nibble is unpacked once per call
 * and reused by every row, whatever its tenant, so a batch of 64 tenants reads the weights once.
 *
 * Algorithm, per output channel pair (n0, n1) and block of up to MB rows:
 *   for each K-group g:            acc[r] = sum_{k in g} X[r, k] * Q[n, k]          (8-wide fp32 FMA)
 *                                  yv[r] += S[slot[r], n, g] * acc[r]                (vector, no hsum)
 *                                  ys[r] -= S[slot[r], n, g] * Z[n, g] * XS[r, g]    (XS = sum_{k in g} X[r, k])
 *   Y[r, n] = hsum(yv[r]) + ys[r] + bias[n]
 * Subtracting Z through the row sums XS keeps the inner loop a plain dot product with the raw integers.
 *
 * Weight layout ("block-32 nibbles", built once by kernels/native.py from the on-disk bit stream): each row
 * of K (a multiple of 32) values is K/2 bytes; in block b, byte b*16 + i holds element b*32 + i in its low
 * nibble and element b*32 + 16 + i in its high nibble, so one 16-byte load gives 32 consecutive weights.
 * 2- and 3-bit integers use the same layout (they fit in a nibble).
 *
 * Threads: OpenMP over channel pairs; the library links the same libgomp that PyTorch loaded, so both share
 * one thread pool.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MB 64 /* rows per block: accumulators for MB rows x 2 channels stay in L1 */

#ifdef __AVX2__
static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    __m128 s = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, s);
    s = _mm_add_ss(s, sh);
    return _mm_cvtss_f32(s);
}

/* 16 bytes -> 32 floats (w[0..3], 8 each) in natural element order */
static inline void unpack32(const uint8_t *p, __m256 w[4]) {
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    __m128i mask = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(b, mask);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}
#endif

/* XS[r, g] = sum of X[r, k] over group g: (M, G) */
static void row_group_sums(const float *X, int64_t M, int64_t K, int64_t G, float *XS) {
    int64_t gs = K / G;
    for (int64_t r = 0; r < M; r++)
        for (int64_t g = 0; g < G; g++) {
            const float *x = X + r * K + g * gs;
            float s = 0.f;
            for (int64_t k = 0; k < gs; k++) s += x[k];
            XS[r * G + g] = s;
        }
}

/*
 * X (M, K) fp32 row-major; Q (N, K/2) uint8 block-32 nibbles; Z (N, G) uint8; S (num_slots, N, G) fp32;
 * slot (M,) int32 (all < num_slots, checked by the caller); bias (N,) or NULL; Y (M, N) fp32.
 * Requires K % 32 == 0 and (K / G) % 32 == 0. Returns 0, or -1 if scratch memory could not be allocated.
 */
int mt_q4_gemm(const float *X, int64_t M, int64_t K, const uint8_t *Q, const uint8_t *Z, const float *S,
               const int32_t *slot, const float *bias, int64_t N, int64_t G, float *Y, int num_threads) {
    const int64_t gs = K / G;
    const int64_t row_bytes = K / 2;
    float *XS = (float *)malloc(sizeof(float) * (size_t)(M * G > 0 ? M * G : 1));
    if (!XS) return -1;
    row_group_sums(X, M, K, G, XS);
    const int64_t num_pairs = (N + 1) / 2;

#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t p = 0; p < num_pairs; p++) {
        const int64_t n0 = 2 * p;
        const int two = (n0 + 1 < N);
        const int64_t n1 = two ? n0 + 1 : n0;
        const uint8_t *q0 = Q + n0 * row_bytes;
        const uint8_t *q1 = Q + n1 * row_bytes;
        for (int64_t mb = 0; mb < M; mb += MB) {
            const int64_t mc = (M - mb < MB) ? (M - mb) : MB;
#ifdef __AVX2__
            __m256 acc0[MB], acc1[MB], yv0[MB], yv1[MB];
            float ys0[MB], ys1[MB];
            for (int64_t r = 0; r < mc; r++) {
                yv0[r] = _mm256_setzero_ps();
                yv1[r] = _mm256_setzero_ps();
                ys0[r] = 0.f;
                ys1[r] = 0.f;
            }
            for (int64_t g = 0; g < G; g++) {
                for (int64_t r = 0; r < mc; r++) {
                    acc0[r] = _mm256_setzero_ps();
                    acc1[r] = _mm256_setzero_ps();
                }
                for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
                    __m256 w0[4], w1[4];
                    unpack32(q0 + k / 2, w0);
                    unpack32(q1 + k / 2, w1);
                    const float *xr = X + mb * K + k;
                    for (int64_t r = 0; r < mc; r++, xr += K) {
                        __m256 x0 = _mm256_loadu_ps(xr);
                        __m256 x1 = _mm256_loadu_ps(xr + 8);
                        __m256 x2 = _mm256_loadu_ps(xr + 16);
                        __m256 x3 = _mm256_loadu_ps(xr + 24);
                        __m256 a0 = _mm256_fmadd_ps(x0, w0[0], acc0[r]);
                        __m256 a1 = _mm256_fmadd_ps(x0, w1[0], acc1[r]);
                        a0 = _mm256_fmadd_ps(x1, w0[1], a0);
                        a1 = _mm256_fmadd_ps(x1, w1[1], a1);
                        a0 = _mm256_fmadd_ps(x2, w0[2], a0);
                        a1 = _mm256_fmadd_ps(x2, w1[2], a1);
                        acc0[r] = _mm256_fmadd_ps(x3, w0[3], a0);
                        acc1[r] = _mm256_fmadd_ps(x3, w1[3], a1);
                    }
                }
                const float z0 = (float)Z[n0 * G + g], z1 = (float)Z[n1 * G + g];
                for (int64_t r = 0; r < mc; r++) {
                    const float *s_row = S + (int64_t)slot[mb + r] * N * G;
                    const float s0 = s_row[n0 * G + g], s1 = s_row[n1 * G + g];
                    const float xs = XS[(mb + r) * G + g];
                    yv0[r] = _mm256_fmadd_ps(_mm256_set1_ps(s0), acc0[r], yv0[r]);
                    yv1[r] = _mm256_fmadd_ps(_mm256_set1_ps(s1), acc1[r], yv1[r]);
                    ys0[r] -= s0 * z0 * xs;
                    ys1[r] -= s1 * z1 * xs;
                }
            }
            for (int64_t r = 0; r < mc; r++) {
                float *y = Y + (mb + r) * N;
                y[n0] = hsum256(yv0[r]) + ys0[r] + (bias ? bias[n0] : 0.f);
                if (two) y[n1] = hsum256(yv1[r]) + ys1[r] + (bias ? bias[n1] : 0.f);
            }
#else
            for (int64_t r = 0; r < mc; r++) {
                const float *x = X + (mb + r) * K;
                const float *s_row = S + (int64_t)slot[mb + r] * N * G;
                for (int c = 0; c <= two; c++) {
                    const int64_t n = c ? n1 : n0;
                    const uint8_t *q = c ? q1 : q0;
                    float y = 0.f;
                    for (int64_t g = 0; g < G; g++) {
                        float acc = 0.f;
                        for (int64_t k = g * gs; k < (g + 1) * gs; k++) {
                            const int64_t b = k / 32, i = k % 32;
                            const uint8_t byte = q[b * 16 + (i & 15)];
                            const float w = (float)(i < 16 ? (byte & 15) : (byte >> 4));
                            acc += x[k] * w;
                        }
                        y += s_row[n * G + g] * (acc - (float)Z[n * G + g] * XS[(mb + r) * G + g]);
                    }
                    Y[(mb + r) * N + n] = y + (bias ? bias[n] : 0.f);
                }
            }
#endif
        }
    }
    free(XS);
    return 0;
}
