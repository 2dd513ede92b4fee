/* Nearest of up to 16 centroids for groups of gathered rows: the inner step of tree routing.
 *
 * For every group g (positions starts[g] .. starts[g+1]-1) and every position i in it:
 *     row  = x + d * (idx ? idx[i] : i)
 *     s_j  = cn[set][j] + sum_{k < d} row[k] * ct[set][k][j]      (j < 16, set = sets[g])
 *     out[i] = smallest j with s_j = min_j s_j                      (numpy argmin semantics)
 * with ct = -2 * centroids^T padded to 16 columns and cn = squared centroid norms (+inf for a
 * child that must never be chosen, and for padding), so s_j = ||row - c_j||^2 - 1 for unit rows.
 *
 * Why hand-written (see hiermem/routing.py for the measurements): the BLAS matmul for a
 * (m x 384) @ (384 x 16) product is fast, but routing also needs a gather of each node's rows into a
 * contiguous block, an add and an argmin, each one more pass over memory and one more Python call
 * per node; here the gather, the 16 dot products, the add and the argmin are one pass, with the GIL
 * released (ctypes) so that threads scale.
 *
 * Determinism: each s_j is one chain of fused multiply-adds over k in increasing order, the same
 * instruction sequence for every row whatever its place in a tile or group (a short last tile is
 * padded with copies of its last row), so a vector gets the same scores, and path, in tree build
 * and in routing. The SIMD variants (AVX-512, AVX2+FMA) give identical results; the portable C
 * variant (no FMA) rounds differently but is the only one used on such a machine.
 */
#include <stdint.h>
#include <math.h>

#define LANES 16

#if defined(__AVX512F__)
#include <immintrin.h>
#define TILE 8
static void tile16(const float* const* rows, int64_t d, const float* ct, const float* cn, int64_t* out, int n) {
    __m512 acc[TILE];
    for (int t = 0; t < TILE; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t k = 0; k < d; k++) {
        const __m512 c = _mm512_loadu_ps(ct + k * LANES);
        for (int t = 0; t < TILE; t++) acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(rows[t][k]), c, acc[t]);
    }
    const __m512 cnv = _mm512_loadu_ps(cn);
    for (int t = 0; t < n; t++) {
        const __m512 s = _mm512_add_ps(acc[t], cnv);
        const float best = _mm512_reduce_min_ps(s);
        const __mmask16 eq = _mm512_cmp_ps_mask(s, _mm512_set1_ps(best), _CMP_EQ_OQ);
        out[t] = eq ? __builtin_ctz((unsigned)eq) : 0;
    }
}
#define HIERMEM_VARIANT "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TILE 6
static void tile16(const float* const* rows, int64_t d, const float* ct, const float* cn, int64_t* out, int n) {
    __m256 lo[TILE], hi[TILE];
    for (int t = 0; t < TILE; t++) lo[t] = hi[t] = _mm256_setzero_ps();
    for (int64_t k = 0; k < d; k++) {
        const __m256 c0 = _mm256_loadu_ps(ct + k * LANES), c1 = _mm256_loadu_ps(ct + k * LANES + 8);
        for (int t = 0; t < TILE; t++) {
            const __m256 v = _mm256_set1_ps(rows[t][k]);
            lo[t] = _mm256_fmadd_ps(v, c0, lo[t]);
            hi[t] = _mm256_fmadd_ps(v, c1, hi[t]);
        }
    }
    for (int t = 0; t < n; t++) {
        float s[LANES];
        _mm256_storeu_ps(s, _mm256_add_ps(lo[t], _mm256_loadu_ps(cn)));
        _mm256_storeu_ps(s + 8, _mm256_add_ps(hi[t], _mm256_loadu_ps(cn + 8)));
        int best = 0;
        for (int j = 1; j < LANES; j++) if (s[j] < s[best]) best = j;
        out[t] = best;
    }
}
#define HIERMEM_VARIANT "avx2"
#else
#define TILE 4
static void tile16(const float* const* rows, int64_t d, const float* ct, const float* cn, int64_t* out, int n) {
    float acc[TILE][LANES] = {{0}};
    for (int64_t k = 0; k < d; k++)
        for (int t = 0; t < TILE; t++) {
            const float v = rows[t][k];
            for (int j = 0; j < LANES; j++) acc[t][j] += v * ct[k * LANES + j];
        }
    for (int t = 0; t < n; t++) {
        int best = 0;
        float sb = acc[t][0] + cn[0];
        for (int j = 1; j < LANES; j++) { const float s = acc[t][j] + cn[j]; if (s < sb) { sb = s; best = j; } }
        out[t] = best;
    }
}
#define HIERMEM_VARIANT "portable"
#endif

const char* hm_variant(void) { return HIERMEM_VARIANT; }

static inline const float* row_at(const float* x, int64_t d, const int64_t* idx, int64_t i) {
    return x + d * (idx ? idx[i] : i);
}

/* Prefetch the rows of the next tile: deeper levels gather rows scattered over memory. */
static inline void prefetch_rows(const float* x, int64_t d, const int64_t* idx, int64_t lo, int64_t hi) {
#if defined(__GNUC__)
    for (int64_t i = lo; i < hi; i++) {
        const char* p = (const char*)row_at(x, d, idx, i);
        for (int64_t b = 0; b < d * (int64_t)sizeof(float); b += 64) __builtin_prefetch(p + b, 0, 3);
    }
#else
    (void)x; (void)d; (void)idx; (void)lo; (void)hi;
#endif
}

void hm_nearest_groups(const float* x, int64_t d, const int64_t* idx, const int64_t* starts,
                       const int64_t* sets, int64_t n_groups, const float* ct, const float* cn, int64_t* out) {
    for (int64_t g = 0; g < n_groups; g++) {
        const int64_t lo = starts[g], hi = starts[g + 1];
        const float* gct = ct + sets[g] * d * LANES;
        const float* gcn = cn + sets[g] * LANES;
        for (int64_t i = lo; i < hi; i += TILE) {
            const float* rows[TILE];
            const int n = (int)(hi - i < TILE ? hi - i : TILE);
            for (int t = 0; t < TILE; t++) rows[t] = row_at(x, d, idx, i + (t < n ? t : n - 1));
            const int64_t next = i + TILE < hi ? i + TILE : hi;
            prefetch_rows(x, d, idx, next, next + TILE < hi ? next + TILE : hi);
            tile16(rows, d, gct, gcn, out + i, n);
        }
    }
}
