// softmax(q k^T * scale) v for one ViT's bf16 self-attention on x86 CPUs with AVX512-BF16, heads 64 wide.
//
// Built and loaded by `native.py` (the C compiler at hand, once per machine), which checks it against torch
// before use. torch on CPU has no bf16 product with fp32 output, so its fused attention there widens q, k and
// v to fp32 and multiplies at the fp32 rate. Here both products run on the bf16 dot-product unit
// (`vdpbf16ps`): the scores q k^T stay fp32 (bf16 x bf16 products are exact in fp32, summed in fp32), the
// softmax is fp32, and the probabilities are rounded to bf16 for the product with v, as torch's own bf16
// flash kernel does; the output is rounded to bf16 once.
//
// Per (image, head): k is packed as 32-bit pairs (k[n][2j], k[n][2j+1]) in column order and v as pairs of
// consecutive rows, both kept in L2 (~150 KB at 577 tokens); then blocks of MR query rows compute their
// scores over all keys (MR x 577 floats, in L1), the softmax, and their output rows.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define D 64
#define MR 6
#define INLINE static inline __attribute__((always_inline))

// e^x for x <= 0 (scores less their row's maximum): x = n ln2 + r, a degree-6 polynomial in r, then 2^n
INLINE __m512 exp512(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(_mm512_set1_ps(-87.3f), x);  // NaN (broken weights) stays NaN: max_ps returns x then
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.3981999507e-3f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
    p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// s[m][n0 .. n0 + 16 nr) = sum_j q[m] pair j . kp[j][n]: mr rows, nr vectors of 16 columns
INLINE void scores(const uint16_t *q, int64_t sq, const uint32_t *kp, int64_t tp, int64_t n0, float *s,
                   const int mr, const int nr) {
    __m512 acc[MR][4];
    for (int m = 0; m < mr; m++)
        for (int c = 0; c < nr; c++) acc[m][c] = _mm512_setzero_ps();
    for (int j = 0; j < D / 2; j++) {
        __m512bh b[4];
        for (int c = 0; c < nr; c++) b[c] = (__m512bh)_mm512_loadu_si512(kp + j * tp + n0 + 16 * c);
        for (int m = 0; m < mr; m++) {
            __m512bh a = (__m512bh)_mm512_set1_epi32(((const uint32_t *)(q + m * sq))[j]);
            for (int c = 0; c < nr; c++) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], a, b[c]);
        }
    }
    for (int m = 0; m < mr; m++)
        for (int c = 0; c < nr; c++) _mm512_storeu_ps(s + m * tp + n0 + 16 * c, acc[m][c]);
}

// out[m] = (sum_i p[m] pair i . vp[i]) * inv[m], rounded to bf16
INLINE void mix(const uint16_t *pb, int64_t tp, const uint32_t *vp, const float *inv, uint16_t *out, int64_t so,
                const int mr) {
    __m512 acc[MR][4];
    for (int m = 0; m < mr; m++)
        for (int c = 0; c < 4; c++) acc[m][c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < tp / 2; i++) {
        __m512bh b[4];
        for (int c = 0; c < 4; c++) b[c] = (__m512bh)_mm512_loadu_si512(vp + i * D + 16 * c);
        for (int m = 0; m < mr; m++) {
            __m512bh a = (__m512bh)_mm512_set1_epi32(((const uint32_t *)(pb + m * tp))[i]);
            for (int c = 0; c < 4; c++) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], a, b[c]);
        }
    }
    for (int m = 0; m < mr; m++) {
        __m512 f = _mm512_set1_ps(inv[m]);
        for (int c = 0; c < 4; c++)
            _mm256_storeu_si256((__m256i *)(out + m * so + 16 * c),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[m][c], f)));
    }
}

// MR (or fewer) query rows: scores, softmax, output
INLINE void row_block(const uint16_t *q, int64_t sq, const uint32_t *kp, const uint32_t *vp, int64_t t, int64_t tp,
                      float scale, float *s, uint16_t *pb, uint16_t *out, int64_t so, const int mr) {
    int64_t n0 = 0;
    for (; n0 + 64 <= tp; n0 += 64) scores(q, sq, kp, tp, n0, s, mr, 4);
    switch ((tp - n0) / 16) {
        case 3: scores(q, sq, kp, tp, n0, s, mr, 3); break;
        case 2: scores(q, sq, kp, tp, n0, s, mr, 2); break;
        case 1: scores(q, sq, kp, tp, n0, s, mr, 1); break;
    }
    float inv[MR];
    const __m512 sc = _mm512_set1_ps(scale);
    for (int m = 0; m < mr; m++) {
        float *row = s + m * tp;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        int64_t n = 0;
        for (; n + 16 <= t; n += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(row + n));
        if (n < t) mx = _mm512_mask_max_ps(mx, (__mmask16)((1u << (t - n)) - 1), mx, _mm512_loadu_ps(row + n));
        const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(mx) * scale);
        __m512 sum = _mm512_setzero_ps();
        uint16_t *prow = pb + m * tp;
        for (n = 0; n < tp; n += 16) {
            __mmask16 keep = n + 16 <= t ? 0xffff : (n < t ? (__mmask16)((1u << (t - n)) - 1) : 0);
            __m512 e = _mm512_maskz_mov_ps(keep, exp512(_mm512_fmsub_ps(_mm512_loadu_ps(row + n), sc, shift)));
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i *)(prow + n), (__m256i)_mm512_cvtneps_pbh(e));
        }
        inv[m] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    mix(pb, tp, vp, inv, out, so, mr);
}

// one (image, head): q, k, v rows of 64 bf16 at row strides sq, sk, sv; out rows at stride so
static void one_head(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out,
                     int64_t t, int64_t sq, int64_t sk, int64_t sv, int64_t so, float scale,
                     uint32_t *kp, uint32_t *vp, float *s, uint16_t *pb) {
    const int64_t tp = (t + 15) / 16 * 16;  // keys padded to whole vectors; padding scores 0, masked
    // kp[j][n] = the pair (k[n][2j], k[n][2j+1]); padded columns 0
    for (int64_t n = 0; n < tp; n++) {
        if (n < t) {
            const uint32_t *row = (const uint32_t *)(k + n * sk);
            for (int j = 0; j < D / 2; j++) kp[j * tp + n] = row[j];
        } else {
            for (int j = 0; j < D / 2; j++) kp[j * tp + n] = 0;
        }
    }
    // vp[i][d] = the pair (v[2i][d], v[2i+1][d]); padded rows 0
    const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                            39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
    for (int64_t i = 0; i < tp / 2; i++) {
        const int ok0 = 2 * i < t, ok1 = 2 * i + 1 < t;
        const uint16_t *p0 = v + (2 * i) * sv, *p1 = v + (2 * i + 1) * sv;
        __m512i r0 = ok0 ? _mm512_loadu_si512(p0) : _mm512_setzero_si512();
        __m512i r1 = ok1 ? _mm512_loadu_si512(p1) : _mm512_setzero_si512();
        __m512i r0h = ok0 ? _mm512_loadu_si512(p0 + 32) : _mm512_setzero_si512();
        __m512i r1h = ok1 ? _mm512_loadu_si512(p1 + 32) : _mm512_setzero_si512();
        uint32_t *dst = vp + i * D;
        _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(r0, lo_idx, r1));
        _mm512_storeu_si512(dst + 16, _mm512_permutex2var_epi16(r0, hi_idx, r1));
        _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(r0h, lo_idx, r1h));
        _mm512_storeu_si512(dst + 48, _mm512_permutex2var_epi16(r0h, hi_idx, r1h));
    }
    int64_t m0 = 0;
    for (; m0 + MR <= t; m0 += MR) row_block(q + m0 * sq, sq, kp, vp, t, tp, scale, s, pb, out + m0 * so, so, MR);
    switch (t - m0) {
        case 5: row_block(q + m0 * sq, sq, kp, vp, t, tp, scale, s, pb, out + m0 * so, so, 5); break;
        case 4: row_block(q + m0 * sq, sq, kp, vp, t, tp, scale, s, pb, out + m0 * so, so, 4); break;
        case 3: row_block(q + m0 * sq, sq, kp, vp, t, tp, scale, s, pb, out + m0 * so, so, 3); break;
        case 2: row_block(q + m0 * sq, sq, kp, vp, t, tp, scale, s, pb, out + m0 * so, so, 2); break;
        case 1: row_block(q + m0 * sq, sq, kp, vp, t, tp, scale, s, pb, out + m0 * so, so, 1); break;
    }
}

// the heads x in [first, last) of a (batch, heads) grid, b = x / heads, h = x % heads; `strides` in elements:
// q's batch, token and head strides, then k's, v's and out's (the last dimension contiguous). 0, or 1 when out
// of memory.
int attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t heads,
                   int64_t first, int64_t last, int64_t t, const int64_t *strides, float scale) {
    const int64_t tp = (t + 15) / 16 * 16;
    uint32_t *kp = aligned_alloc(64, (size_t)(D / 2) * tp * 4);
    uint32_t *vp = aligned_alloc(64, (size_t)(tp / 2) * D * 4);
    float *s = aligned_alloc(64, (size_t)MR * tp * 4);
    uint16_t *pb = aligned_alloc(64, (size_t)MR * tp * 2 + 64);
    if (!kp || !vp || !s || !pb) { free(kp); free(vp); free(s); free(pb); return 1; }
    for (int64_t x = first; x < last; x++) {
        const int64_t b = x / heads, h = x % heads;
        one_head(q + b * strides[0] + h * strides[2], k + b * strides[3] + h * strides[5],
                 v + b * strides[6] + h * strides[8], out + b * strides[9] + h * strides[11], t,
                 strides[1], strides[4], strides[7], strides[10], scale, kp, vp, s, pb);
    }
    free(kp); free(vp); free(s); free(pb);
    return 0;
}
