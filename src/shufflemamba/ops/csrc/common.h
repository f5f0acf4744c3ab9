/*
 * Helpers shared by the CPU kernels (selective_scan.c, mixer_cl.c).
 *
 * Everything here is static inline or a macro, so each kernel file inlines its own copy and the
 * compiler can vectorise through it. The macros take the element type and the exp / log1p to
 * use, because each kernel body is built once for float (sm_expf, sm_softplusf, ...) and once for
 * double (exp, log1p).
 */
#ifndef SHUFFLEMAMBA_COMMON_H
#define SHUFFLEMAMBA_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 2^k from the bits of kf = x + 1.5 * 2^23 + 127 (k = round(x), -126 <= k <= 127): the low mantissa
 * bits of kf are k + 127, the biased exponent, so shifting them into the exponent field gives 2^k;
 * (0x4B400000 + k + 127) << 23 mod 2^32 = (k + 127) << 23. Used by sm_exp2f and sm_expf. */
static inline float sm_pow2_from_magic(int32_t bits) {
    const uint32_t sbits = (uint32_t)bits << 23;
    float scale;
    memcpy(&scale, &sbits, sizeof scale);
    return scale;
}

/* 2^t for float, inlined so that the compiler vectorises it without a libmvec call per vector.
 * t = k + f with k = round(t), |f| <= 1/2; 2^f from a degree-5 polynomial (coefficients fitted for
 * relative error on [-1/2, 1/2], 1.9e-7 evaluated in float; 2^0 = 1 exactly), 2^k from the exponent
 * bits. k comes from adding 1.5 * 2^23 + 127: the sum's low mantissa bits are k + 127, i.e. the
 * biased exponent already, so 2^k is those bits shifted left by 23 and k itself one integer
 * subtract and convert away. Rounding and converting with vrndscaleps / vcvtps2dq (the older
 * Cephes-style code) cost 3 of ~19 vector ops, all on one port of the Intel machine; this is ~13
 * (measured there: 1.2x the exp throughput). (kf - magic) cannot stand for k: -ffast-math folds
 * (t + magic) - magic back to t. t is clamped to [-126, 127] (2^-126 is the smallest normal). */
static inline float sm_exp2f(float t) {
    t = t < -126.0f ? -126.0f : (t > 127.0f ? 127.0f : t);
    const float kf = t + (12582912.0f + 127.0f);
    int32_t bits;
    memcpy(&bits, &kf, sizeof bits);
    const float f = t - (float)(bits - (0x4B400000 + 127));
    float p = 1.3264816952869296e-3f;
    p = p * f + 9.671512991189957e-3f;
    p = p * f + 5.550733581185341e-2f;
    p = p * f + 2.4022242426872253e-1f;
    p = p * f + 6.931470036506653e-1f;
    p = p * f + 1.0f;
    return p * sm_pow2_from_magic(bits);
}

/* Kernel work buffers on 64-byte boundaries: their rows (EB floats, a multiple of 16) are then whole
 * cache lines, so no 512-bit load or store of them straddles two lines (glibc's malloc aligns to 16
 * bytes only). Freed with free(). NULL on failure, like malloc. */
static inline void *sm_aligned_malloc(size_t bytes) {
    void *p = NULL;
    return posix_memalign(&p, 64, bytes ? bytes : 64) == 0 ? p : NULL;
}

/* name_SFX: the functions of a body file included once per element type (conv_cl_body.h, mixer_cl_body.h,
 * rms_cl_body.h, scan_steps_generic.h) are written CL_FN(name), SFX (f32, f64) defined before each #include */
#define CL_CAT_(a, b) a##_##b
#define CL_CAT(a, b) CL_CAT_(a, b)
#define CL_FN(name) CL_CAT(name, SFX)

/* log2(e) and ln(2) in double: cast to the kernel's element type where used */
#define SM_LOG2E_D 1.4426950408889634074
#define SM_LN2_D 0.69314718055994530942

/* e^x for float, accurate to ~2 ulp on [-87, 88] (softplus, sigmoid and expm1 need it for large
 * |x|, where rounding x log2(e) first would cost ~1e-6 relative): Cephes-style, x = k ln2 + r with
 * |r| <= ln2 / 2 (ln2 split in two so that r is exact to ~1 ulp), degree-7 polynomial for e^r; k and 2^k
 * from the same magic-number addition as sm_exp2f. The scans' decays use sm_exp2f instead. */
static inline float sm_expf(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float kf = x * (float)SM_LOG2E_D + (12582912.0f + 127.0f);
    int32_t bits;
    memcpy(&bits, &kf, sizeof bits);
    const float k = (float)(bits - (0x4B400000 + 127));
    /* explicit fmas: written as x - k c1 + k c2, -ffast-math reassociates to x + k c2 - k c1, whose
     * first sum rounds (~1e-6 relative error in the result for |x| ~ 20). Without hardware FMA,
     * fmaf would be a libm call per element, so there the plain (reassociable) form stays. */
#if defined(__FMA__) || defined(__aarch64__)
    const float r = __builtin_fmaf(k, 2.12194440e-4f, __builtin_fmaf(k, -0.693359375f, x));
#else
    const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
#endif
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    return p * sm_pow2_from_magic(bits);
}

/* expm1 for float, inlined: glibc's vector expm1f is a call of ~70 instructions per 8 lanes
 * (counted with valgrind, AVX2); this is about 30. Where exp(x) - 1 would cancel (|x| < 0.35) a
 * degree-7 Taylor polynomial (remainder below 6e-9), elsewhere exp(x) - 1 (relative error below
 * 3e-7); both computed and one selected, so the loop stays branch-free and vectorised. */
static inline float sm_expm1f(float x) {
    const float e = sm_expf(x) - 1.0f;
    float p = 1.0f / 5040.0f;
    p = p * x + 1.0f / 720.0f;
    p = p * x + 1.0f / 120.0f;
    p = p * x + 1.0f / 24.0f;
    p = p * x + 1.0f / 6.0f;
    p = p * x + 0.5f;
    p = p * (x * x) + x;
    return (x < 0.35f && x > -0.35f) ? p : e;
}

/* softplus for float, inlined: max(x, 0) + log1p(exp(-|x|)), with log1p(t) = 2 atanh(t / (2 + t))
 * for t = exp(-|x|) in (0, 1]: s = t / (2 + t) <= 1/3 involves no cancellation (exact for tiny t),
 * and the odd series to s^13 is within 1.5e-8 relative. Replaces log1pf(expf(x)), whose vector
 * log1pf is a call of ~56 instructions per 8 lanes (valgrind, AVX2). torch's threshold is kept
 * (x > 20 -> x), so results match F.softplus. */
static inline float sm_softplusf(float x) {
    const float t = sm_expf(x < 0.0f ? x : -x);
    const float s = t / (2.0f + t), s2 = s * s;
    float p = 2.0f / 13.0f;
    p = p * s2 + 2.0f / 11.0f;
    p = p * s2 + 2.0f / 9.0f;
    p = p * s2 + 2.0f / 7.0f;
    p = p * s2 + 2.0f / 5.0f;
    p = p * s2 + 2.0f / 3.0f;
    const float r = (x > 0.0f ? x : 0.0f) + (2.0f * s + s * s2 * p);
    return x > 20.0f ? x : r;
}

/* the double versions: libm (the float64 kernels are the reference-precision path, not the fast one) */
static inline double sm_softplus(double x) { return x > 20.0 ? x : log1p(exp(x)); }

/* softplus(x) with torch's threshold (x > 20 -> x), so results match F.softplus.
 * x is evaluated more than once: pass a plain variable. */
#define SM_SOFTPLUS(T, EXP, LOG1P, x) ((x) > (T)20 ? (x) : LOG1P(EXP(x)))

/* sigmoid(x) = 1 / (1 + exp(-x)) */
#define SM_SIGMOID(T, EXP, x) ((T)1 / ((T)1 + EXP(-(x))))

/* Flush denormals to zero (FTZ) and read denormal inputs as zero (DAZ) on this thread while a
 * kernel's parallel region runs, then restore the caller's mode. Long products of decays
 * (exp(delta A) over many steps, as with Vim's zero dt_proj_b bias: steps ~0.7) end in denormals,
 * which x86 cores process through a microcode assist ~100x slower than normal numbers; measured
 * here: the mixer's scan backward took 24% longer with Vim's initialisation until this was added.
 * Values below 1.2e-38 (fp32) become zero, as on GPUs. A no-op off x86. */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define SM_FTZ_BEGIN                                                                               \
    const unsigned int sm_csr_ = _mm_getcsr();                                                     \
    _mm_setcsr(sm_csr_ | 0x8040u);
#define SM_FTZ_END _mm_setcsr(sm_csr_);
#else
#define SM_FTZ_BEGIN
#define SM_FTZ_END
#endif

#endif /* SHUFFLEMAMBA_COMMON_H */
