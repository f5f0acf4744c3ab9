/*
 * The pointwise functions of the explicit x86 kernels (float32, over vec_x86.h's primitives): 2^t for the
 * decays, e^x, 1 / x, softplus and sigmoid, each on M vectors at once. Part of scan_steps_x86.h (included
 * from it once SM_CV is defined), not to be included alone.
 *   - 2^t as p(t - floor t) * 2^floor(t): with AVX-512 vreduceps and vscalefps (7 vector ops where the
 *     portable version needs 12: clamp, magic-number rounding, integer shift, convert), with AVX2
 *     vroundps and an integer add to the exponent bits (11, its clamp included).
 *   - The decays' t = d A log2(e) is <= 0 for A < 0 <= d; below -126 every build gives 0 (to float precision).
 */
#ifndef SHUFFLEMAMBA_POINTWISE_X86_H
#define SHUFFLEMAMBA_POINTWISE_X86_H
#ifndef SM_CV
#error "pointwise_x86.h is part of scan_steps_x86.h"
#endif

/* The pointwise functions below take M independent vectors (M a constant at every call site: a pass's
 * SM_CV, or 1) and run each step on all of them before the next. gcc emits x86 code in the order of the source
 * (it schedules only after register allocation), so one vector's whole chain of ~30 dependent steps at a
 * time left the pipes waiting on latency: the delta row (dt_proj and softplus) alone took 29.8 cycles a
 * vector, 21.6 at M 6 (AVX2 on the Zen 5, a scratch harness); in the kernel, where the state loops' work
 * overlaps some of that wait, the mixer core's forward 1.04-1.05x at 512 bits and 1.02-1.04x as an AVX2
 * build (profile_train_step.py --core, tiny224 / d192 / demo16). always_inline: called at several sites,
 * gcc otherwise kept some out of line, the arrays then in memory. */
#define SM_M_MAX SM_CV /* their scratch arrays' length: the most vectors a call takes */
#define SM_EACH(i, M) _Pragma("GCC unroll 16") for (int i = 0; i < (M); ++i)
#define SM_INLINE static inline __attribute__((always_inline))

/* 2^t: p(f) 2^floor(t), f = t - floor(t) in [0, 1); p a degree-5 polynomial with p(0) = 1 (so 2^k is
 * exact), coefficients fitted for relative error on [0, 1] (1.6e-7 evaluated in float, against
 * sm_exp2f's 1.9e-7). With AVX-512, vscalefps gives 0 below the normal range (FTZ is on in the kernels)
 * and propagates NaN: no clamp; with AVX2, t is clamped to SM_EXP2_MIN (vec_x86.h). */
SM_INLINE void sm_vpow2_frac_m(const sm_vf *f, sm_vf *p, int M) { /* p(f) ~ 2^f */
    SM_EACH(i, M) p[i] = sm_vfma(sm_vset1(1.8671332e-3f), f[i], sm_vset1(9.0170223e-3f));
    SM_EACH(i, M) p[i] = sm_vfma(p[i], f[i], sm_vset1(5.5799920e-2f));
    SM_EACH(i, M) p[i] = sm_vfma(p[i], f[i], sm_vset1(2.4016444e-1f));
    SM_EACH(i, M) p[i] = sm_vfma(p[i], f[i], sm_vset1(6.9315130e-1f));
    SM_EACH(i, M) p[i] = sm_vfma(p[i], f[i], sm_vset1(1.0f));
}
static inline sm_vf sm_vexp2(sm_vf t) { /* t <= 0: the decays */
#ifdef SM_EXP2_MIN
    t = sm_vmax(t, sm_vset1(SM_EXP2_MIN));
#endif
    const sm_vf f = sm_vfrac(t);
    sm_vf p;
    sm_vpow2_frac_m(&f, &p, 1);
    return sm_vldexp_floor(p, t);
}

/* e^x to a few ulp: x log2(e) as hi + lo (the FMA gives the product's rounding error exactly, plus
 * the part of log2(e) that float drops), so that |x| up to ~88 costs no relative accuracy (2^(x
 * log2(e)) with the product rounded would: ~1e-6 at |x| = 20); then 2^hi 2^lo as sm_vexp2 does.
 * 12 vector ops where sm_expf, vectorised by the compiler, takes ~19 (clamps, magic-number
 * rounding, integer shift and convert). x is clamped to [SM_EXP_MIN, SM_EXP_MAX] (vec_x86.h): inf or
 * 1.65e38 above ~88, 0 below ~-87.3, as e^x in float32 */
SM_INLINE void sm_vexp_m(sm_vf *x, int M) {
    const sm_vf l2e = sm_vset1(1.44269502162933349609375f); /* float(log2 e) */
    sm_vf hi[SM_M_MAX], f[SM_M_MAX], p[SM_M_MAX];
    /* |x| ~1e30 would turn lo into nonsense */
    SM_EACH(i, M) x[i] = sm_vmax(sm_vmin(x[i], sm_vset1(SM_EXP_MAX)), sm_vset1(SM_EXP_MIN));
    SM_EACH(i, M) hi[i] = sm_vmul(x[i], l2e);
    SM_EACH(i, M) f[i] = sm_vfma(x[i], sm_vset1(1.925963033500011e-8f), sm_vfmsub(x[i], l2e, hi[i])); /* lo */
    SM_EACH(i, M) f[i] = sm_vadd(sm_vfrac(hi[i]), f[i]);
    sm_vpow2_frac_m(f, p, M);
    SM_EACH(i, M) x[i] = sm_vldexp_floor(p[i], hi[i]);
}
/* 1 / d: the approximate reciprocal and one Newton step (2^-28 relative with AVX-512's, ~2^-23 with AVX2's) */
SM_INLINE void sm_vrecip_m(sm_vf *d, int M) {
    sm_vf r[SM_M_MAX];
    SM_EACH(i, M) r[i] = sm_vrcp(d[i]);
    SM_EACH(i, M) d[i] = sm_vmul(r[i], sm_vfnmadd(d[i], r[i], sm_vset1(2.0f)));
}
/* softplus as sm_softplusf computes it (max(x, 0) + 2 atanh(t / (2 + t)), t = e^-|x|; x > 20 -> x,
 * torch's threshold), with sm_vexp_m and sm_vrecip_m: ~30 vector ops against ~45 */
SM_INLINE void sm_vsoftplus_m(sm_vf *x, int M) {
    sm_vf t[SM_M_MAX], s[SM_M_MAX], s2[SM_M_MAX], p[SM_M_MAX];
    SM_EACH(i, M) t[i] = sm_vsub(sm_vzero(), sm_vabs(x[i]));
    sm_vexp_m(t, M);
    SM_EACH(i, M) s[i] = sm_vadd(t[i], sm_vset1(2.0f));
    sm_vrecip_m(s, M);
    SM_EACH(i, M) s[i] = sm_vmul(t[i], s[i]);
    SM_EACH(i, M) s2[i] = sm_vmul(s[i], s[i]);
    SM_EACH(i, M) p[i] = sm_vfma(sm_vset1(2.0f / 13.0f), s2[i], sm_vset1(2.0f / 11.0f));
    SM_EACH(i, M) p[i] = sm_vfma(p[i], s2[i], sm_vset1(2.0f / 9.0f));
    SM_EACH(i, M) p[i] = sm_vfma(p[i], s2[i], sm_vset1(2.0f / 7.0f));
    SM_EACH(i, M) p[i] = sm_vfma(p[i], s2[i], sm_vset1(2.0f / 5.0f));
    SM_EACH(i, M) p[i] = sm_vfma(p[i], s2[i], sm_vset1(2.0f / 3.0f));
    SM_EACH(i, M) {
        const sm_vf r = sm_vadd(sm_vmax(x[i], sm_vzero()), sm_vfma(sm_vmul(s[i], s2[i]), p[i], sm_vadd(s[i], s[i])));
        x[i] = sm_vsel_gt(x[i], sm_vset1(20.0f), x[i], r);
    }
}
/* sigmoid(z) = 1 / (1 + e^-z), into s; -z clamped to 88 so that 1 + e^-z stays finite (the reciprocal
 * of inf would be 0 * inf in the Newton step) */
SM_INLINE void sm_vsigmoid_m(const sm_vf *z, sm_vf *s, int M) {
    SM_EACH(i, M) s[i] = sm_vmin(sm_vsub(sm_vzero(), z[i]), sm_vset1(88.0f));
    sm_vexp_m(s, M);
    SM_EACH(i, M) s[i] = sm_vadd(s[i], sm_vset1(1.0f));
    sm_vrecip_m(s, M);
}
/* one vector: the masked ends of rows */
SM_INLINE sm_vf sm_vsigmoid(sm_vf z) {
    sm_vf s;
    sm_vsigmoid_m(&z, &s, 1);
    return s;
}

#endif /* SHUFFLEMAMBA_POINTWISE_X86_H */
