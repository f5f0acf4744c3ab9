/*
 * The conv's rows of mixer_cl.c in explicit x86 vectors (float32): SiLU, the forward's output rows and the
 * backward's rows, each vector of channels kept in registers across the taps and steps. Part of
 * scan_steps_x86.h (included from it, after the pointwise functions these use), not to be included alone.
 */
#ifndef SHUFFLEMAMBA_CONV_STEPS_X86_H
#define SHUFFLEMAMBA_CONV_STEPS_X86_H
static inline void cl_silu_n_f32(float *CL_RESTRICT o, int64_t n) {
    int64_t e = 0;
    for (; e + SM_ROWM * SM_VL <= n; e += SM_ROWM * SM_VL) { /* SM_ROWM vectors together (scan_steps_x86.h) */
        sm_vf p[SM_ROWM], s[SM_ROWM];
        SM_EACH(i, SM_ROWM) p[i] = sm_vload(o + e + i * SM_VL);
        sm_vsigmoid_m(p, s, SM_ROWM);
        SM_EACH(i, SM_ROWM) sm_vstore(o + e + i * SM_VL, sm_vmul(p[i], s[i]));
    }
    for (; e < n; e += SM_VL) { /* the rest a vector at a time, the last partial one under a mask */
        const int m = n - e < SM_VL ? (int)(n - e) : SM_VL;
        const sm_vf p = sm_vload_n(o + e, m);
        sm_vstore_n(o + e, sm_vmul(p, sm_vsigmoid(p)), m);
    }
}
/* the conv kernels' explicit paths take up to CL_VK taps (Vim: 4) */
#define CL_VK 4
/* The conv's rows in registers, for K <= CL_VK taps: out = init + sum_k w_k row_k (init: a row added to,
 * or 0 for NULL), then SiLU with silu, each vector of channels summed over the taps in a register and
 * stored once, where the generic loops pass over the row once per tap (and once more for the SiLU).
 * rows[k] is NULL for a tap outside the sequence: tap k reads step t + dir (K - 1 - k) */
static inline void sm_conv_tap_rows(const float **rows, const float *base, int64_t stride, int64_t L, int64_t K,
                                    int64_t t, int dir) {
    for (int64_t k = 0; k < K; ++k) {
        const int64_t src = t + dir * (K - 1 - k);
        rows[k] = src >= 0 && src < L ? base + src * stride : NULL;
    }
}
static inline void sm_conv_row(float *out, const float *init, const float **rows, const float *CL_RESTRICT wt,
                               int64_t E, int64_t K, int silu) {
    int64_t e0 = 0;
    if (K == CL_VK && rows[0] && rows[1] && rows[2] && rows[3]) {
        /* a row between the edges: its whole vectors without tests of the taps, the last partial one below */
        const float *CL_RESTRICT r0 = rows[0], *CL_RESTRICT r1 = rows[1], *CL_RESTRICT r2 = rows[2];
        const float *CL_RESTRICT r3 = rows[3];
        for (; e0 + SM_ROWM * SM_VL <= E; e0 += SM_ROWM * SM_VL) { /* SM_ROWM vectors together */
            sm_vf v[SM_ROWM], s[SM_ROWM];
            SM_EACH(i, SM_ROWM) {
                const int64_t e = e0 + i * SM_VL;
                v[i] = init ? sm_vload(init + e) : sm_vzero();
                v[i] = sm_vfma(sm_vload(wt + e), sm_vload(r0 + e), v[i]);
                v[i] = sm_vfma(sm_vload(wt + E + e), sm_vload(r1 + e), v[i]);
                v[i] = sm_vfma(sm_vload(wt + 2 * E + e), sm_vload(r2 + e), v[i]);
                v[i] = sm_vfma(sm_vload(wt + 3 * E + e), sm_vload(r3 + e), v[i]);
            }
            if (silu) {
                sm_vsigmoid_m(v, s, SM_ROWM);
                SM_EACH(i, SM_ROWM) v[i] = sm_vmul(v[i], s[i]);
            }
            SM_EACH(i, SM_ROWM) sm_vstore(out + e0 + i * SM_VL, v[i]);
        }
    }
    for (int64_t e = e0; e < E; e += SM_VL) {
        const int m = E - e < SM_VL ? (int)(E - e) : SM_VL;
        sm_vf v = init ? sm_vload_n(init + e, m) : sm_vzero();
        for (int64_t k = 0; k < K; ++k)
            if (rows[k]) v = sm_vfma(sm_vload_n(wt + k * E + e, m), sm_vload_n(rows[k] + e, m), v);
        sm_vstore_n(out + e, silu ? sm_vmul(v, sm_vsigmoid(v)) : v, m);
    }
}
/* one output row of the conv + SiLU (conv_cl_body.h's cv_fwd_row); 0 for K > CL_VK (the caller's loops run) */
static inline int cl_conv_fwd_row_f32(const float *xb, int64_t sx_t, const float *CL_RESTRICT wt,
                                      const float *CL_RESTRICT bias, float *CL_RESTRICT o, int64_t E, int64_t L,
                                      int64_t K, int64_t t, int reverse) {
    if (K > CL_VK) return 0;
    const float *xr[CL_VK];
    sm_conv_tap_rows(xr, xb, sx_t, L, K, t, reverse ? 1 : -1);
    sm_conv_row(o, bias, xr, wt, E, K, 1);
    return 1;
}
/* one row of the conv backward's dx (conv_cl_body.h's cv_bwd_sample): d (+)= sum_k w_k gpre_t(k); 0 for
 * K > CL_VK */
static inline int cl_conv_dx_row_f32(float *d, int acc, const float *CL_RESTRICT gpre, const float *CL_RESTRICT wt,
                                     int64_t E, int64_t L, int64_t K, int64_t s, int reverse) {
    if (K > CL_VK) return 0;
    const float *gr[CL_VK];
    sm_conv_tap_rows(gr, gpre, E, L, K, s, reverse ? -1 : 1);
    sm_conv_row(d, acc ? d : NULL, gr, wt, E, K, 0);
    return 1;
}
/* go silu'(p) = go s (1 + p (1 - s)), with 1 - s = e^-p s for p > 0: no cancellation where s ~ 1 (an
 * approximate reciprocal's last bits, multiplied by p, made 1 - s wrong for large p). The backward's rows
 * run a vector at a time: together (SM_ROWM), the mixer core's backward measured 0.97-1.0x */
static inline sm_vf sm_vdsilu(sm_vf p, sm_vf go) {
    sm_vf e = sm_vmin(sm_vsub(sm_vzero(), p), sm_vset1(88.0f));
    sm_vexp_m(&e, 1);
    sm_vf s = sm_vadd(e, sm_vset1(1.0f));
    sm_vrecip_m(&s, 1);
    const sm_vf oms = sm_vsel_gt(p, sm_vzero(), sm_vmul(e, s), sm_vsub(sm_vset1(1.0f), s)); /* 1 - s */
    return sm_vmul(sm_vmul(go, s), sm_vfma(p, oms, sm_vset1(1.0f)));
}
static inline void cl_dsilu_n_f32(float *CL_RESTRICT gp, const float *CL_RESTRICT go, float *CL_RESTRICT db,
                                  int64_t n) {
    int64_t e = 0;
    for (; e + SM_VL <= n; e += SM_VL) {
        const sm_vf g = sm_vdsilu(sm_vload(gp + e), sm_vload(go + e));
        sm_vstore(gp + e, g);
        sm_vstore(db + e, sm_vadd(sm_vload(db + e), g));
    }
    if (e < n) {
        const int m = (int)(n - e);
        const sm_vf g = sm_vdsilu(sm_vload_n(gp + e, m), sm_vload_n(go + e, m));
        sm_vstore_n(gp + e, g, m);
        sm_vstore_n(db + e, sm_vadd(sm_vload_n(db + e, m), g), m);
    }
}
/* CL_VPF (knobs.h): steps ahead that the first pass prefetches its rows */
/* one step t of the conv backward's first pass (below) for the channels at e (m of them): gpre's row, db and
 * dW's sums. With checked = 0 every tap is inside the sequence, with full = 1 the vector is whole: both
 * constants at each call site, so that the steps between the edges run without the taps' bounds tests and
 * the masked moves (gcc kept both inside the loop: about 70 instructions a step where the arithmetic is
 * about 35) */
static inline void sm_conv_bwd_step(const float *xb, int64_t sx_t, const float *wt, const float *go, float *gpre,
                                    sm_vf vb, sm_vf *aw, sm_vf *ab, const sm_vf *w, int64_t E, int64_t L,
                                    int64_t K, int64_t t, int64_t e, int m, int reverse, const int checked,
                                    const int full) {
    sm_vf xs[CL_VK], pre = vb;
    if (t + CL_VPF < L) { /* a step's rows are 1.5-3 KB apart: the stride prefetchers lose them */
        const int64_t src = reverse ? t + CL_VPF + K - 1 : t + CL_VPF;
        if (src < L) __builtin_prefetch(xb + src * sx_t + e, 0, 3);
        __builtin_prefetch(go + (t + CL_VPF) * E + e, 0, 3);
    }
#pragma GCC unroll 4
    for (int k = 0; k < CL_VK; ++k) {
        const int64_t src = reverse ? t + (K - 1 - k) : t - (K - 1 - k);
        const int in = k < K && (!checked || (src >= 0 && src < L));
        xs[k] = !in ? sm_vzero() : full ? sm_vload(xb + src * sx_t + e) : sm_vload_n(xb + src * sx_t + e, m);
#if SM_VL == 16
        pre = sm_vfma(w[k], xs[k], pre);
#else /* AVX2's 16 registers: the taps' weights read from L1 each step */
        (void)w;
        if (k < K) pre = sm_vfma(full ? sm_vload(wt + k * E + e) : sm_vload_n(wt + k * E + e, m), xs[k], pre);
#endif
    }
    const sm_vf g = sm_vdsilu(pre, full ? sm_vload(go + t * E + e) : sm_vload_n(go + t * E + e, m));
    if (full)
        sm_vstore(gpre + t * E + e, g);
    else
        sm_vstore_n(gpre + t * E + e, g, m);
    *ab = sm_vadd(*ab, g);
#pragma GCC unroll 4
    for (int k = 0; k < CL_VK; ++k) aw[k] = sm_vfma(g, xs[k], aw[k]);
}
/* The conv backward's first pass (conv_cl_body.h's cv_bwd_sample) of one sample for K <= CL_VK taps, a
 * vector of channels at a time: the pre-activation, silu', db and dW stay in registers across the L
 * steps and each step's rows are read once, where the generic loops make K + 1 passes over a row of
 * gpre and K over the rows of dW in memory per step. Writes gpre (L x E) for the caller's dx pass,
 * which runs row by row for every type. Returns 1, or 0 for K > CL_VK (the caller runs the generic
 * loops). Measured on the Intel Xeon
 * (scratch interleaved A/B of the conv backward alone): 1.3-1.5x at the demo16 shape (128, 17, 192),
 * 1.4-1.55x at D 192 (64, 65, 384); without the prefetch, 1.24x and 0.98x. */
static inline int cl_conv_bwd_sample_f32(const float *xb, int64_t sx_t, const float *wt, const float *bias,
                                         const float *go, float *dw, float *db, float *gpre, int64_t E,
                                         int64_t L, int64_t K, int reverse) {
    if (K > CL_VK) return 0;
    /* the steps whose taps all lie inside the sequence: [lo, hi), [K - 1, L) forward and [0, L - K + 1)
     * reversed, clamped so that lo <= hi when L < K */
    const int64_t lo = reverse ? 0 : (K - 1 < L ? K - 1 : L), hi = reverse ? (L - K + 1 > 0 ? L - K + 1 : 0) : L;
    for (int64_t e = 0; e < E; e += SM_VL) {
        const int m = E - e < SM_VL ? (int)(E - e) : SM_VL;
        sm_vf aw[CL_VK], ab = sm_vzero(), w[CL_VK];
        const sm_vf vb = bias ? sm_vload_n(bias + e, m) : sm_vzero();
#pragma GCC unroll 4
        for (int k = 0; k < CL_VK; ++k) {
            aw[k] = sm_vzero();
            w[k] = SM_VL == 16 && k < K ? sm_vload_n(wt + k * E + e, m) : sm_vzero();
        }
        if (m == SM_VL) {
            for (int64_t t = 0; t < lo; ++t)
                sm_conv_bwd_step(xb, sx_t, wt, go, gpre, vb, aw, &ab, w, E, L, K, t, e, m, reverse, 1, 1);
            for (int64_t t = lo; t < hi; ++t)
                sm_conv_bwd_step(xb, sx_t, wt, go, gpre, vb, aw, &ab, w, E, L, K, t, e, m, reverse, 0, 1);
            for (int64_t t = hi; t < L; ++t)
                sm_conv_bwd_step(xb, sx_t, wt, go, gpre, vb, aw, &ab, w, E, L, K, t, e, m, reverse, 1, 1);
        } else {
            for (int64_t t = 0; t < L; ++t)
                sm_conv_bwd_step(xb, sx_t, wt, go, gpre, vb, aw, &ab, w, E, L, K, t, e, m, reverse, 1, 0);
        }
        sm_vstore_n(db + e, sm_vadd(sm_vload_n(db + e, m), ab), m);
        for (int k = 0; k < K; ++k) sm_vstore_n(dw + k * E + e, sm_vadd(sm_vload_n(dw + k * E + e, m), aw[k]), m);
    }
    return 1;
}
#endif /* SHUFFLEMAMBA_CONV_STEPS_X86_H */
