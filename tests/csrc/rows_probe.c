/*
 * Test-only library (tests/test_cpu_kernel_sources.py): the float32 row functions of scan_steps.h
 * over n values, built with the kernels' flags, so the tests reach them without an export in the
 * production library. All run under FTZ, as in the kernels. The row functions take n a multiple of
 * EB (1 otherwise, nothing written); silu and its derivative take any n (the vectors' masked tail).
 */
#include "common.h"

#define CL_RESTRICT __restrict__
#include "knobs.h"
#include "scan_steps.h"

int probe_softplus(const float *x, float *out, int64_t n) { /* softplus(x) */
    if (n % EB) return 1;
    SM_FTZ_BEGIN
    float zero[EB];
    for (int j = 0; j < EB; ++j) zero[j] = 0.0f;
    for (int64_t i = 0; i < n; i += EB) sl_softplus_row_f32(x + i, zero, out + i);
    SM_FTZ_END
    return 0;
}

int probe_sigmoid(const float *x, float *out, int64_t n) { /* sigmoid(x) */
    if (n % EB) return 1;
    SM_FTZ_BEGIN
    for (int64_t i = 0; i < n; i += EB) sl_sigmoid_row_f32(x + i, out + i);
    SM_FTZ_END
    return 0;
}

int probe_dsoftplus(const float *x, float *out, int64_t n) { /* -expm1(-x): softplus' derivative from its output */
    if (n % EB) return 1;
    SM_FTZ_BEGIN
    for (int64_t i = 0; i < n; i += EB) sl_dsoftplus_row_f32(x + i, out + i);
    SM_FTZ_END
    return 0;
}

int probe_gate(const float *x, float *out, int64_t n) { /* x sigmoid(x): the gate with y = 1, scale 1 */
    if (n % EB) return 1;
    SM_FTZ_BEGIN
    for (int64_t i = 0; i < n; ++i) out[i] = 1.0f;
    for (int64_t i = 0; i < n; i += EB) sl_gate_row_f32(out + i, x + i, 1.0f);
    SM_FTZ_END
    return 0;
}

int probe_silu(const float *x, float *out, int64_t n) { /* the conv's SiLU, any n */
    SM_FTZ_BEGIN
    for (int64_t i = 0; i < n; ++i) out[i] = x[i];
    cl_silu_n_f32(out, n);
    SM_FTZ_END
    return 0;
}

int probe_dsilu(const float *x, float *out, int64_t n) { /* silu'(x), any n: out = zeros + 1 silu'(x) */
    float *gp = (float *)malloc(sizeof(float) * (size_t)(n ? n : 1));
    float *go = (float *)malloc(sizeof(float) * (size_t)(n ? n : 1));
    if (!gp || !go) {
        free(gp);
        free(go);
        return 1;
    }
    SM_FTZ_BEGIN
    for (int64_t i = 0; i < n; ++i) gp[i] = x[i], go[i] = 1.0f, out[i] = 0.0f;
    cl_dsilu_n_f32(gp, go, out, n); /* gp = go silu'(gp); out (the bias gradient) += it */
    SM_FTZ_END
    free(gp);
    free(go);
    return 0;
}

/* which state loops the probe was built with: their vector bits, 0 for the generic ones */
int probe_state_loop_bits(void) { return SM_STATE_LOOP_BITS; }
