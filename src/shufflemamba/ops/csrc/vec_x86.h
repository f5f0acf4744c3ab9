/*
 * The vector primitives of the explicit x86 state loops (scan_steps_x86.h), one set per build, chosen by
 * scan_steps.h:
 *   SM_VEC_AVX512, SM_VECTOR_BITS 512   __m512 (AVX-512 F, DQ)
 *   SM_VEC_AVX512, SM_VECTOR_BITS 256   __m256 with AVX-512 VL's vreduceps, vscalefps and mask registers
 *   SM_VEC_AVX2                         __m256 with AVX2 + FMA only (AMD Zen 3 and most laptops and desktops)
 * Each set defines the vector type sm_vf of SM_VL floats, arithmetic (sm_vadd, sm_vfma, ...), masked
 * loads and stores of the first m lanes, horizontal sums, and the two halves of 2^t:
 *   sm_vfrac(t)           t - floor(t)
 *   sm_vldexp_floor(p, t) p 2^floor(t), for p in [1, 2] (2^frac(t) from a polynomial)
 * and the clamps that keep them in range (SM_EXP2_MIN, SM_EXP_MIN, SM_EXP_MAX). AVX-512's vscalefps
 * handles the whole range itself; AVX2 adds floor(t) to p's exponent bits, which is right while
 * floor(t) >= -127 (below -126 the bits are a denormal, which the kernels read as zero: FTZ / DAZ on,
 * as vscalefps gives 0 there) and the result stays finite.
 */
#ifndef SHUFFLEMAMBA_VEC_X86_H
#define SHUFFLEMAMBA_VEC_X86_H
#include <immintrin.h>

#if defined(SM_VEC_AVX512) && SM_VECTOR_BITS == 512
typedef __m512 sm_vf;
#define SM_VL 16
#define sm_vload _mm512_loadu_ps
#define sm_vstore _mm512_storeu_ps
#define sm_vset1 _mm512_set1_ps
#define sm_vzero _mm512_setzero_ps
#define sm_vmul _mm512_mul_ps
#define sm_vadd _mm512_add_ps
#define sm_vfma _mm512_fmadd_ps
#define sm_vfrac(x) _mm512_reduce_ps((x), 0x09) /* x - floor(x): round down (01), no precision exception (8) */
#define sm_vldexp_floor _mm512_scalef_ps       /* a * 2^floor(b) */
#define sm_vsub _mm512_sub_ps
#define sm_vmax _mm512_max_ps
#define sm_vmin _mm512_min_ps
#define sm_vabs _mm512_abs_ps
#define sm_vfmsub _mm512_fmsub_ps   /* a b - c */
#define sm_vfnmadd _mm512_fnmadd_ps /* c - a b */
#define sm_vrcp _mm512_rcp14_ps     /* 1 / x to 2^-14 relative */
#define sm_vsel_gt(x, c, a, b) _mm512_mask_blend_ps(_mm512_cmp_ps_mask((x), (c), _CMP_GT_OQ), (b), (a)) /* x > c ? a : b */
#define sm_vmask(m) ((__mmask16)((1u << (m)) - 1u)) /* the first m lanes */
#define sm_vload_n(p, m) _mm512_maskz_loadu_ps(sm_vmask(m), (p))           /* zeros past them */
#define sm_vstore_n(p, v, m) _mm512_mask_storeu_ps((p), sm_vmask(m), (v))
static inline float sm_vhsum(sm_vf v) { return _mm512_reduce_add_ps(v); }
/* the sums of SM_VL vectors at once: lane i of the result is the sum of v[i] (a tree of 128-bit-block
 * and in-lane shuffles, 45 ops and a permutation where 16 separate horizontal sums take ~130) */
static inline sm_vf sm_vhsum_all(const sm_vf *v) {
    sm_vf a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i)
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; ++i)
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
    const sm_vf d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
    /* lane 4 b + a of d holds the sum of v[4 a + b]: transpose the 4 x 4 lane grid */
    return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), d);
}
#define SM_EXP_MIN -104.0f /* vscalefps flushes what is below the normal range to 0 */
#define SM_EXP_MAX 89.0f   /* and gives inf above it */

#elif (defined(SM_VEC_AVX512) && SM_VECTOR_BITS == 256) || defined(SM_VEC_AVX2)
typedef __m256 sm_vf;
#define SM_VL 8
#define sm_vload _mm256_loadu_ps
#define sm_vstore _mm256_storeu_ps
#define sm_vset1 _mm256_set1_ps
#define sm_vzero _mm256_setzero_ps
#define sm_vmul _mm256_mul_ps
#define sm_vadd _mm256_add_ps
#define sm_vfma _mm256_fmadd_ps
#define sm_vsub _mm256_sub_ps
#define sm_vmax _mm256_max_ps
#define sm_vmin _mm256_min_ps
#define sm_vabs(x) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), (x))
#define sm_vfmsub _mm256_fmsub_ps
#define sm_vfnmadd _mm256_fnmadd_ps
static inline float sm_vhsum(sm_vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline sm_vf sm_vhsum_all(const sm_vf *v) { /* as the 512-bit one: 8 sums */
    sm_vf a[4], b[2];
    for (int i = 0; i < 4; ++i)
        a[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20),
                             _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
    for (int i = 0; i < 2; ++i)
        b[i] = _mm256_add_ps(_mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                             _mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
    const sm_vf d = _mm256_add_ps(_mm256_shuffle_ps(b[0], b[1], 0x88), _mm256_shuffle_ps(b[0], b[1], 0xDD));
    /* lane 4 b + a of d holds the sum of v[2 a + b] */
    return _mm256_permutevar8x32_ps(d, _mm256_set_epi32(7, 3, 6, 2, 5, 1, 4, 0));
}
#ifdef SM_VEC_AVX512 /* AVX-512 VL at 256 bits */
#define sm_vfrac(x) _mm256_reduce_ps((x), 0x09)
#define sm_vldexp_floor _mm256_scalef_ps
#define sm_vrcp _mm256_rcp14_ps
#define sm_vsel_gt(x, c, a, b) _mm256_mask_blend_ps(_mm256_cmp_ps_mask((x), (c), _CMP_GT_OQ), (b), (a))
#define sm_vmask(m) ((__mmask8)((1u << (m)) - 1u))
#define sm_vload_n(p, m) _mm256_maskz_loadu_ps(sm_vmask(m), (p))
#define sm_vstore_n(p, v, m) _mm256_mask_storeu_ps((p), sm_vmask(m), (v))
#define SM_EXP_MIN -104.0f
#define SM_EXP_MAX 89.0f
#else /* AVX2 + FMA: no vreduceps, vscalefps or mask registers */
#define sm_vfrac(x) _mm256_sub_ps((x), _mm256_floor_ps(x))
/* p 2^floor(t): floor(t) added to p's exponent bits (one integer add; the compiler shares the floor with
 * sm_vfrac's). The callers clamp t (SM_EXP2_MIN, SM_EXP_MIN, SM_EXP_MAX) so that no exponent wraps */
static inline sm_vf sm_vldexp_floor(sm_vf p, sm_vf t) {
    const __m256i k = _mm256_slli_epi32(_mm256_cvttps_epi32(_mm256_floor_ps(t)), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), k));
}
#define sm_vrcp _mm256_rcp_ps /* 1 / x to 1.5 2^-12 relative: one Newton step gives ~2^-23 */
#define sm_vsel_gt(x, c, a, b) _mm256_blendv_ps((b), (a), _mm256_cmp_ps((x), (c), _CMP_GT_OQ))
static inline __m256i sm_vmask(int m) { /* the first m lanes, as a vector mask */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(m), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
/* a whole vector takes the plain move (no mask to build, no register for it; the compiler hoists the test
 * out of loops over a fixed m), a partial one the masked move */
static inline sm_vf sm_vload_n(const float *p, int m) {
    return m == SM_VL ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, sm_vmask(m));
}
static inline void sm_vstore_n(float *p, sm_vf v, int m) {
    if (m == SM_VL)
        _mm256_storeu_ps(p, v);
    else
        _mm256_maskstore_ps(p, sm_vmask(m), v);
}
#define SM_EXP2_MIN -127.0f /* floor >= -127: p 2^-127 is a denormal, read as 0 */
#define SM_EXP_MIN -88.0f   /* x log2(e) >= -126.96: the same */
#define SM_EXP_MAX 88.0f    /* x log2(e) <= 126.96: finite (e^88 = 1.65e38; sm_expf clamps there too) */
#endif

#else
#error "vec_x86.h: define SM_VEC_AVX512 (with SM_VECTOR_BITS 512 or 256) or SM_VEC_AVX2"
#endif

#endif /* SHUFFLEMAMBA_VEC_X86_H */
