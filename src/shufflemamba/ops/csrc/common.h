/*
 * Helpers shared by the CPU kernels (selective_scan.c, mixer_cl.c).
 *
 * Everything here is static inline or a macro, so each kernel file inlines its own copy and the
 * compiler can vectorise through it. The macros take the element type and the exp / log1p to
 * use, because each kernel body is stamped out once for float (sm_expf, sm_softplusf, ...) and once for
 * double (exp, log1p).
 */
#ifndef SHUFFLEMAMBA_COMMON_H
#define SHUFFLEMAMBA_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp for float, inlined so that the compiler vectorises it without a libmvec call per vector
 * (measured ~20-30% faster per scan here). Cephes-style: x = k ln2 + r with |r| <= ln2 / 2
 * (ln2 split in two for exactness), degree-6 polynomial for e^r, 2^k built from the exponent
 * bits. Relative error about 2 ulp on [-87, 88]; inputs are clamped to that range. */
static inline float sm_expf(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float k = __builtin_rintf(x * 1.44269504088896341f);
    float r = x - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
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
