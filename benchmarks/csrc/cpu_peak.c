/*
 * Peak arithmetic rates of this CPU, in the form the scan kernels use them (benchmarks/scan_limit.py):
 *   fma_rate: fused multiply-adds per second, vectors of 16 floats, 16 independent accumulators
 *             (enough to cover the FMA latency on current x86 cores), every thread busy;
 *   exp_rate: the 2^x the scans' decays call, per second, over an L1-resident row of 64 floats --
 *             the shape of the scan's inner loops: with AVX-512 and SM_VECTOR_BITS (the kernels'
 *             flags) the explicit-vector sm_vexp2 of scan_steps.h, else sm_exp2f (common.h) in an
 *             `omp simd` loop (exp_path() says which: its vector bits, or 0). Each exp's input is
 *             independent of the previous results, so this measures throughput, not latency.
 * Both return operations per second summed over `nthreads` OpenMP threads.
 */
#include <omp.h>
#include <stdint.h>

#include "common.h"

#define EB 64 /* the row length below; scan_steps.h needs a block width */
#define CL_RESTRICT __restrict__
#include "scan_steps.h"

typedef float v16 __attribute__((vector_size(64)));

double fma_rate(int64_t iters, int nthreads) {
    double t0 = omp_get_wtime();
    float sink = 0.0f;
#pragma omp parallel num_threads(nthreads) reduction(+ : sink)
    {
        v16 acc[16];
        const v16 m = (v16){0} + 0.999999f, c = (v16){0} + 1e-7f;
        for (int i = 0; i < 16; ++i) acc[i] = (v16){0} + (float)(i + omp_get_thread_num());
        for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
            for (int i = 0; i < 16; ++i) acc[i] = acc[i] * m + c;
        }
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 16; ++j) sink += acc[i][j];
    }
    double dt = omp_get_wtime() - t0;
    return sink == -1.0f ? 0.0 : (double)iters * 16 * 16 * nthreads / dt;
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
                sm_vstore(y + j, sm_vload(y + j) + sm_vexp2(sm_vload(x + j) + off));
#else
#pragma omp simd
            for (int j = 0; j < 64; ++j) y[j] += sm_exp2f(x[j] - 1e-3f * (float)(it & 7)); /* independent exps */
#endif
        }
        for (int j = 0; j < 64; ++j) sink += y[j];
    }
    double dt = omp_get_wtime() - t0;
    return sink == -1.0f ? 0.0 : (double)iters * 64 * nthreads / dt;
}

/* which exp exp_rate measured: the vector bits of sm_vexp2, or 0 for sm_exp2f */
int exp_path(void) { return SM_STATE_LOOP_BITS; }
