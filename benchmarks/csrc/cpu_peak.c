/*
 * Peak arithmetic rates of this CPU, in the form the scan kernels use them (benchmarks/scan_limit.py):
 *   fma_rate: fused multiply-adds per second with the widest vectors the build has (AVX-512: 16
 *             floats, AVX/AVX2: 8, NEON or SSE: 4; fma_bits() says which) and enough independent
 *             accumulators to cover the FMA latency without spilling a register, every thread busy;
 *   exp_rate: the 2^x the scans' decays call, per second, over an L1-resident row of 64 floats --
 *             the shape of the scan's inner loops: where scan_steps.h has explicit vectors for the
 *             build (SM_SCAN_VECTOR_PATH) its sm_vexp2, else sm_exp2f (common.h) in an `omp simd`
 *             loop (exp_path() says which: its vector bits, or 0). Each exp's input is independent
 *             of the previous results, so this measures throughput, not latency.
 * Both return operations per second summed over `nthreads` OpenMP threads.
 */
#include <omp.h>
#include <stdint.h>

#include "common.h"

#define EB 64 /* the row length below; scan_steps.h needs a block width */
#define CL_RESTRICT __restrict__
#include "scan_steps.h"

/* Vector lanes and accumulators: the accumulators plus the two constants must fit the register file
 * (a vector type wider than the ISA's, or more accumulators than registers, is split and spilled to
 * the stack: a 16-float type measured 6.8 G FMA/s on a 2-core AVX2 Zen 3 that does ~100). 12 chains cover an FMA latency
 * of 4-6 cycles on two pipes (current x86); 16 on the ISAs with 32 registers. */
#if defined(__AVX512F__)
#define PK_LANES 16
#define PK_ACC 16
#elif defined(__AVX__)
#define PK_LANES 8
#define PK_ACC 12
#elif defined(__aarch64__)
#define PK_LANES 4
#define PK_ACC 16
#else
#define PK_LANES 4
#define PK_ACC 12
#endif
typedef float pk_vf __attribute__((vector_size(PK_LANES * 4)));

double fma_rate(int64_t iters, int nthreads) {
    double t0 = omp_get_wtime();
    float sink = 0.0f;
#pragma omp parallel num_threads(nthreads) reduction(+ : sink)
    {
        pk_vf acc[PK_ACC];
        const pk_vf m = (pk_vf){0} + 0.999999f, c = (pk_vf){0} + 1e-7f;
        for (int i = 0; i < PK_ACC; ++i) acc[i] = (pk_vf){0} + (float)(i + omp_get_thread_num());
        for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
            for (int i = 0; i < PK_ACC; ++i) acc[i] = acc[i] * m + c; /* an FMA under -ffast-math */
        }
        for (int i = 0; i < PK_ACC; ++i)
            for (int j = 0; j < PK_LANES; ++j) sink += acc[i][j];
    }
    double dt = omp_get_wtime() - t0;
    return sink == -1.0f ? 0.0 : (double)iters * PK_ACC * PK_LANES * nthreads / dt;
}

/* y[0..64) += 2^(x - off), the generic path's row, vectorised as the kernels' omp simd loops are */
static inline void exp_row(const float *CL_RESTRICT x, float *CL_RESTRICT y, float off) {
#pragma omp simd
    for (int j = 0; j < 64; ++j) y[j] += sm_exp2f(x[j] - off);
}

double exp_rate(int64_t iters, int nthreads) {
    double t0 = omp_get_wtime();
    float sink = 0.0f;
#pragma omp parallel num_threads(nthreads) reduction(+ : sink)
    {
        float x[64], y[64];
        for (int j = 0; j < 64; ++j) x[j] = -0.01f * (float)(j + 1), y[j] = 0.0f;
        for (int64_t it = 0; it < iters; ++it) {
#ifdef SM_SCAN_VECTOR_PATH
            const sm_vf off = sm_vset1(-1e-3f * (float)(it & 7));
#pragma GCC unroll 16
            for (int j = 0; j < 64; j += SM_VL) /* independent exps */
                sm_vstore(y + j, sm_vadd(sm_vload(y + j), sm_vexp2(sm_vadd(sm_vload(x + j), off))));
#else
            exp_row(x, y, 1e-3f * (float)(it & 7)); /* independent exps */
            /* one row per step, as in the kernels: without this the compiler jams pairs of steps
             * into one loop, which it leaves scalar (gcc 12, AVX2) */
            __asm__ volatile("" ::: "memory");
#endif
        }
        for (int j = 0; j < 64; ++j) sink += y[j];
    }
    double dt = omp_get_wtime() - t0;
    return sink == -1.0f ? 0.0 : (double)iters * 64 * nthreads / dt;
}

/* which exp exp_rate measured: the vector bits of sm_vexp2, or 0 for sm_exp2f */
int exp_path(void) { return SM_STATE_LOOP_BITS; }

/* the vector bits of fma_rate's FMAs, and the instruction set they come from */
int fma_bits(void) { return PK_LANES * 32; }
const char *fma_isa(void) {
#if defined(__AVX512F__)
    return "AVX-512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "AVX2+FMA";
#elif defined(__AVX__)
    return "AVX (no FMA: a multiply and an add)";
#elif defined(__aarch64__)
    return "NEON";
#else
    return "SSE or scalar";
#endif
}
