/*
 * The depthwise causal conv1d + SiLU of mixer_cl.c for one element type, forward and backward, and the
 * mixer forward's conv + x_proj over chunks of steps (cx_fwd). Included once per type before
 * mixer_cl_body.h (whose fused kernels call these rows): mixer_cl.c defines T, SFX and SQRT before each
 * #include, and CL_FN(name) is name_SFX. No include guard, on purpose.
 */
/* dst (cols x rows) = src (rows x cols) transposed. The kernels take each weight in its module's layout
 * ((E, K), (E, N), (E, R)) and read it channels-innermost from one transposed copy per call: a few
 * thousand values, where transposing in Python cost a torch op and a copy per weight and call */
static void CL_FN(cl_transpose)(T *CL_RESTRICT dst, const T *CL_RESTRICT src, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
}
/* src (rows x cols) transposed into a new 64-byte-aligned buffer (free() it); NULL: out of memory */
static T *CL_FN(cl_transposed)(const T *CL_RESTRICT src, int64_t rows, int64_t cols) {
    T *dst = (T *)sm_aligned_malloc(sizeof(T) * (size_t)(rows * cols));
    if (dst) CL_FN(cl_transpose)(dst, src, rows, cols);
    return dst;
}

/* out = the sum over the nth threads' rows of parts (row length P) of their rows x cols block at off, in
 * thread order (bit-identical for a given thread count); written transposed (cols x rows) with tr, so
 * each gradient leaves in its parameter's layout. Called by the whole team after the loop that filled
 * parts (whose omp for ends in a barrier), each thread a share; no barrier after: blocks are disjoint */
static void CL_FN(cl_reduce_block)(T *CL_RESTRICT out, const T *CL_RESTRICT parts, int64_t P, int64_t off,
                                   int64_t rows, int64_t cols, int tr, int64_t nth) {
    #pragma omp for schedule(static) nowait
    for (int64_t c = 0; c < cols; ++c)
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = off + r * cols + c;
            T s = parts[i];
            for (int64_t t = 1; t < nth; ++t) s += parts[t * P + i];
            out[tr ? c * rows + r : r * cols + c] = s;
        }
}

/* row t of a sample's conv: pre = bias + sum_k w[k] x[t -/+ (K-1-k)]. xb: the sample's input
 * rows (time stride sx_t); o: the row written */
static inline void CL_FN(cv_pre_row)(const T *xb, int64_t sx_t, const T *CL_RESTRICT wt,
                                    const T *CL_RESTRICT bias, T *CL_RESTRICT o, int64_t E,
                                    int64_t L, int64_t K, int64_t t, int reverse) {
    for (int64_t e = 0; e < E; ++e) o[e] = bias ? bias[e] : (T)0;
    for (int64_t k = 0; k < K; ++k) {
        const int64_t src = reverse ? t + (K - 1 - k) : t - (K - 1 - k);
        if (src < 0 || src >= L) continue;
        const T *CL_RESTRICT xr = xb + src * sx_t, *CL_RESTRICT w = wt + k * E;
        for (int64_t e = 0; e < E; ++e) o[e] += w[e] * xr[e];
    }
}
/* o = silu(pre) of row t; o's row t + CL_PF is prefetched */
static inline void CL_FN(cv_fwd_row)(const T *xb, int64_t sx_t, const T *CL_RESTRICT wt,
                                    const T *CL_RESTRICT bias, T *CL_RESTRICT o, int64_t E,
                                    int64_t L, int64_t K, int64_t t, int reverse) {
    if (t + CL_PF < L) { /* the next rows: the newest input row it reads, its output row */
        const int64_t src = reverse ? t + CL_PF + K - 1 : t + CL_PF;
        if (src < L) CL_PREFETCH(xb + src * sx_t, E, 0);
        CL_PREFETCH(o + CL_PF * E, E, 1);
    }
    if (CL_FN(cl_conv_fwd_row)(xb, sx_t, wt, bias, o, E, L, K, t, reverse)) return; /* scan_steps.h */
    CL_FN(cv_pre_row)(xb, sx_t, wt, bias, o, E, L, K, t, reverse);
    CL_FN(cl_silu_n)(o, E);
}
/* w: the conv's weight (E, K), as the module holds it; 1: out of memory */
int CL_FN(cv_fwd)(const T *x, int64_t sx_b, int64_t sx_t, const T *CL_RESTRICT w,
                 const T *CL_RESTRICT bias, T *CL_RESTRICT out, int64_t batch, int64_t E,
                 int64_t L, int64_t K, int reverse, int nthreads) {
    T *wt = CL_FN(cl_transposed)(w, E, K); /* (K, E) */
    if (!wt) return 1;
    #pragma omp parallel for num_threads(nthreads) if (nthreads > 1) schedule(static)
    for (int64_t bt = 0; bt < batch * L; ++bt)
        CL_FN(cv_fwd_row)(x + (bt / L) * sx_b, sx_t, wt, bias, out + bt * E, E, L, K, bt % L, reverse);
    free(wt);
    return 0;
}

/* the conv + SiLU and x_proj of the mixer's forward over chunks of CX_ROWS steps, the chunks of all samples
 * spread over the threads: u = silu(conv(x)) (batch, L, E) contiguous, xdbl = u xw^T (batch, L, J)
 * contiguous, xw (J, E). For fewer samples than threads, where sl_fwd's fused mode (a whole sample on one
 * thread) would leave threads idle: the separate conv pass and a (batch L, E) x (E, J) torch.mm it
 * replaces read u once more and ran x_proj's narrow product (J 44 at Vim-Ti) at ~45 G multiply-adds/s
 * (AMD EPYC Zen 4, 2 threads). 2: J too wide, 1: out of memory */
#define CX_ROWS 64 /* 64 rows of E 384: 96 KB of u, in L2 for its x_proj right after */
int CL_FN(cx_fwd)(const T *x, int64_t sx_b, int64_t sx_t, const T *CL_RESTRICT cw, const T *CL_RESTRICT cbias,
                 T *CL_RESTRICT u, const T *CL_RESTRICT xw, T *CL_RESTRICT xdbl, int64_t batch, int64_t E,
                 int64_t L, int64_t K, int64_t J, int reverse, int nthreads) {
    if (J > SM_XPROJ_MAX) return 2;
    const int64_t JP = (J + 15) / 16 * 16, nch = (L + CX_ROWS - 1) / CX_ROWS;
    T *xwt = (T *)calloc((size_t)(E * JP), sizeof(T));            /* xw transposed, (E, JP), zero-padded */
    T *cwt = CL_FN(cl_transposed)(cw, E, K);                      /* (K, E) */
    if (!xwt || !cwt) {
        free(xwt);
        free(cwt);
        return 1;
    }
    for (int64_t j = 0; j < J; ++j)
        for (int64_t e = 0; e < E; ++e) xwt[e * JP + j] = xw[j * E + e];
    #pragma omp parallel for num_threads(nthreads) if (nthreads > 1) schedule(static)
    for (int64_t it = 0; it < batch * nch; ++it) {
        const int64_t b = it / nch, t0 = (it % nch) * CX_ROWS, t1 = t0 + CX_ROWS < L ? t0 + CX_ROWS : L;
        T *ub = u + b * L * E;
        for (int64_t t = t0; t < t1; ++t) CL_FN(cv_fwd_row)(x + b * sx_b, sx_t, cwt, cbias, ub + t * E, E, L, K, t, reverse);
        CL_FN(sl_xproj_rows)(ub + t0 * E, t1 - t0, E, xwt, J, JP, xdbl + (b * L + t0) * J); /* scan_steps.h */
    }
    free(xwt);
    free(cwt);
    return 0;
}

/* the conv backward of one sample (go: its (L, E) output gradient rows; dxb: its dx rows, stride
 * sdx_t; dw, db: added to; gpre: L x E scratch): cv_bwd's loop body, and sl_bwd's with the conv fused */
static void CL_FN(cv_bwd_sample)(const T *xb, int64_t sx_t, const T *CL_RESTRICT wt, const T *CL_RESTRICT bias,
                                const T *CL_RESTRICT go_b, T *dxb, int64_t sdx_t, int acc_dx,
                                T *CL_RESTRICT dw, T *CL_RESTRICT db, T *CL_RESTRICT gpre, int64_t E,
                                int64_t L, int64_t K, int reverse) {
    /* float32 on AVX-512: the first pass with registers across the steps (scan_steps.h) */
    if (!CL_FN(cl_conv_bwd_sample)(xb, sx_t, wt, bias, go_b, dw, db, gpre, E, L, K, reverse))
    for (int64_t t = 0; t < L; ++t) {
        T *CL_RESTRICT gp = gpre + t * E;
        const T *CL_RESTRICT go = go_b + t * E;
        if (t + CL_PF < L) {
            const int64_t src = reverse ? t + CL_PF + K - 1 : t + CL_PF;
            if (src < L) CL_PREFETCH(xb + src * sx_t, E, 0);
            CL_PREFETCH(go_b + (t + CL_PF) * E, E, 0);
        }
        CL_FN(cv_pre_row)(xb, sx_t, wt, bias, gp, E, L, K, t, reverse);
        CL_FN(cl_dsilu_n)(gp, go, db, E); /* gp = go silu'(gp), db += gp (scan_steps.h) */
        for (int64_t k = 0; k < K; ++k) {
            const int64_t src = reverse ? t + (K - 1 - k) : t - (K - 1 - k);
            if (src < 0 || src >= L) continue;
            const T *CL_RESTRICT xr = xb + src * sx_t;
            T *CL_RESTRICT dwk = dw + k * E;
            for (int64_t e = 0; e < E; ++e) dwk[e] += gp[e] * xr[e];
        }
    }
    /* dx[s] = sum_k w[k] gpre[t] over the outputs t that read s, a row of dx at a time: dx's
     * rows are (batch, L, 2E) rows, 3 KB apart at D 192, and a vector of channels down the L
     * rows (an earlier AVX-512 pass's dx) met each as a cache miss the prefetchers
     * did not see (perf: its dx load the mixer core's hottest instruction at the D 192 shape)   */
    for (int64_t s = 0; s < L; ++s) {
        T *CL_RESTRICT d = dxb + s * sdx_t;
        if (s + CL_PF < L) CL_PREFETCH(dxb + (s + CL_PF) * sdx_t, E, 1);
        if (CL_FN(cl_conv_dx_row)(d, acc_dx, gpre, wt, E, L, K, s, reverse)) continue; /* scan_steps.h */
        if (!acc_dx)
            for (int64_t e = 0; e < E; ++e) d[e] = (T)0;
        for (int64_t k = 0; k < K; ++k) {
            const int64_t t = reverse ? s - (K - 1 - k) : s + (K - 1 - k);
            if (t < 0 || t >= L) continue;
            const T *CL_RESTRICT gp = gpre + t * E, *CL_RESTRICT w = wt + k * E;
            for (int64_t e = 0; e < E; ++e) d[e] += w[e] * gp[e];
        }
    }
}
/* dx (batch, L, E) strided (sdx_b, sdx_t), written, or added to with acc_dx (the mixer's
 * two directions sum into one gradient buffer); w: the weight (E, K); dw_out (E, K) and db_out (E; NULL: not wanted):
 * written, reduced over the threads here (cl_reduce_block) */
int CL_FN(cv_bwd)(const T *x, int64_t sx_b, int64_t sx_t, const T *CL_RESTRICT w,
                 const T *CL_RESTRICT bias, const T *CL_RESTRICT gout, T *dx, int64_t sdx_b,
                 int64_t sdx_t, int acc_dx, T *CL_RESTRICT dw_out, T *CL_RESTRICT db_out,
                 int64_t batch, int64_t E, int64_t L, int64_t K, int reverse, int nthreads) {
    int failed = 0;
    const int64_t P = (K + 1) * E; /* a thread's row of partial sums: dw (K, E) | db */
    T *parts = (T *)calloc((size_t)nthreads * (size_t)P, sizeof(T));
    T *wt = CL_FN(cl_transposed)(w, E, K); /* (K, E) */
    if (!parts || !wt) {
        free(parts);
        free(wt);
        return 1;
    }
    #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        SM_FTZ_BEGIN
        T *gpre = (T *)sm_aligned_malloc(sizeof(T) * (size_t)(L * E)); /* dL/dpre, one sample */
        const int64_t tid = CL_THREAD_NUM(); /* this thread's row of parts */
        if (!gpre) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; ++b) {
            if (!gpre) continue;
            T *CL_RESTRICT dw = parts + tid * P, *CL_RESTRICT db = dw + K * E;
            CL_FN(cv_bwd_sample)(x + b * sx_b, sx_t, wt, bias, gout + b * L * E, dx + b * sdx_b, sdx_t, acc_dx,
                                dw, db, gpre, E, L, K, reverse);
        }
        CL_FN(cl_reduce_block)(dw_out, parts, P, 0, K, E, 1, nthreads);
        if (db_out) CL_FN(cl_reduce_block)(db_out, parts, P, K * E, 1, E, 0, nthreads);
        SM_FTZ_END
        free(gpre);
    }
    free(parts);
    free(wt);
    return failed;
}
