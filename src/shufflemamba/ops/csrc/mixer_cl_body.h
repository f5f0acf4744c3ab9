/*
 * The channel-last selective scans of mixer_cl.c for one element type, included once per type after
 * conv_cl_body.h: mixer_cl.c defines T (float, double), SFX (f32, f64) and SQRT (sqrtf, sqrt) before
 * each #include, and CL_FN(name) is name_SFX. No include guard, on purpose.
 *
 *   sl_fwd / sl_bwd      the selective scan (with dt_proj, and in the mixer x_proj and the conv, fused)
 */
/* sl_fwd / sl_bwd's weights channels-innermost, in one 64-byte-aligned buffer (returned; free() it; NULL: out
 * of memory): *At (N, E) from A (E, N), *dtw (R, E) from dtpw (E, R), *cwt (K, E) from cw (E, K); a NULL
 * dtpw / cw gives a NULL *dtw / *cwt */
static T *CL_FN(sl_weights_t)(const T *A, const T *dtpw, const T *cw, int64_t E, int64_t N, int64_t R, int64_t K,
                              T **At, T **dtw, T **cwt) {
    const int64_t r = dtpw ? R : 0, k = cw ? K : 0;
    T *lay = (T *)sm_aligned_malloc(sizeof(T) * (size_t)((N + r + k) * E));
    if (!lay) return NULL;
    *At = lay;
    *dtw = dtpw ? lay + N * E : NULL;
    *cwt = cw ? lay + (N + r) * E : NULL;
    CL_FN(cl_transpose)(*At, A, E, N);
    if (dtpw) CL_FN(cl_transpose)(*dtw, dtpw, E, R);
    if (cw) CL_FN(cl_transpose)(*cwt, cw, E, K);
    return lay;
}

int CL_FN(sl_fwd)(const T *CL_RESTRICT u, const T *CL_RESTRICT delta, const T *CL_RESTRICT A,
                 const T *Bm, int64_t sB_b, int64_t sB_t, const T *Cm, int64_t sC_b,
                 int64_t sC_t, const T *CL_RESTRICT D, const T *z, int64_t sz_b, int64_t sz_t,
                 const T *CL_RESTRICT dbias, T *CL_RESTRICT out, T *CL_RESTRICT dsave,
                 T *CL_RESTRICT ysave, int64_t batch, int64_t E, int64_t L, int64_t N, int softplus, int reverse,
                 double oscale, int accumulate, const T *dt, int64_t sdt_b, int64_t sdt_t,
                 const T *CL_RESTRICT dtpw, int64_t R, const T *cx, int64_t scx_b, int64_t scx_t,
                 const T *CL_RESTRICT cw, const T *CL_RESTRICT cbias, int64_t K,
                 const T *CL_RESTRICT xw, T *xdbl, int nthreads) {
    /* out = oscale * y, out += oscale * y with accumulate 1, or out = oscale * gate(y + out) with
     * accumulate 2: the mixer's first direction writes its y (+ D u) ungated and unscaled, the
     * second adds its own and gates the sum, with no separate (y_f + y_b) / 2 pass and one gate
     * (sigmoid(z), z read) per element instead of one per direction (the earlier form: each
     * direction gated its y and the second added its half, accumulate 1).
     * A: (E, N). With dtpw, dt_proj's weight (E, R), given, delta is not read: delta_t = dtpw dt_t is
     * formed per step from dt (batch, L, R) strided (dt_proj fused: no (batch, L, E) delta written or read).
     * With cx (the mixer, dt_proj fused), the conv + SiLU and x_proj run here too, per sample
     * before its scan: u (written, so not const in this mode) = silu(conv(cx)) with cw (E, K),
     * cbias; xdbl (batch, L, R + 2N) contiguous = u xw^T with xw (R + 2N, E), which dt, Bm, Cm
     * must point into. A sample's work then runs on one thread (batch below the thread count
     * leaves threads idle: the caller keeps the separate kernels there) */
    const T os = (T)oscale;
    int failed = 0;
    const int64_t nblk = (E + EB - 1) / EB;
    if (cx && (!xw || !xdbl || !dtpw || R + 2 * N > SM_XPROJ_MAX)) return 2;
    T *At, *dtw, *cwt, *lay = CL_FN(sl_weights_t)(A, dtpw, cx ? cw : NULL, E, N, R, K, &At, &dtw, &cwt);
    if (!lay) return 1;
    const int64_t J = R + 2 * N, JP = (J + 15) / 16 * 16; /* x_proj's outputs, padded */
    T *xwt = NULL; /* xw transposed, (E, JP), zero-padded: x_proj's product vectorises over J */
    if (cx) {
        xwt = (T *)calloc((size_t)(E * JP), sizeof(T));
        if (!xwt) {
            free(lay);
            return 1;
        }
        for (int64_t j = 0; j < J; ++j)
            for (int64_t e = 0; e < E; ++e) xwt[e * JP + j] = xw[j * E + e];
    }
    #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        SM_FTZ_BEGIN
        T *buf = (T *)sm_aligned_malloc(sizeof(T) * (size_t)(2 * N * EB + 8 * EB + R * EB));
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        }
        /* items (sample, channel block), or with cx whole samples, their blocks in turn */
        #pragma omp for schedule(static)
        for (int64_t it = 0; it < (cx ? batch : batch * nblk); ++it)
        for (int64_t bk = 0; bk < (cx ? nblk : 1); ++bk) {
            const int64_t item = cx ? it * nblk + bk : it;
            if (!buf) continue;
            if (cx && bk == 0) { /* a new sample: its conv and x_proj first */
                const int64_t b = item / nblk;
                T *ub = (T *)u + b * L * E; /* u is this mode's output */
                for (int64_t t = 0; t < L; ++t)
                    CL_FN(cv_fwd_row)(cx + b * scx_b, scx_t, cwt, cbias, ub + t * E, E, L, K, t, reverse);
                CL_FN(sl_xproj_rows)(ub, L, E, xwt, J, JP, xdbl + b * L * J); /* scan_steps.h */
            }
            T *CL_RESTRICT h = buf, *CL_RESTRICT Ab = buf + N * EB;
            T *CL_RESTRICT bs = Ab + N * EB, *CL_RESTRICT Ds = bs + EB, *CL_RESTRICT d = Ds + EB;
            T *CL_RESTRICT uu = d + EB, *CL_RESTRICT du = uu + EB, *CL_RESTRICT y = du + EB;
            T *CL_RESTRICT zz = y + EB, *CL_RESTRICT dl = zz + EB, *CL_RESTRICT wb = dl + EB;
            const int64_t b = item / nblk, e0 = (item % nblk) * EB;
            const int64_t ne = E - e0 < EB ? E - e0 : EB;
            CL_LOAD_A_LOG2E(T, Ab, At, N, E, e0, ne);
            if (dbias) CL_LOAD(T, bs, dbias + e0, ne); else memset(bs, 0, sizeof(T) * EB);
            if (dtw)
                for (int64_t r = 0; r < R; ++r) CL_LOAD(T, wb + r * EB, dtw + r * E + e0, ne);
            if (D) CL_LOAD(T, Ds, D + e0, ne); else memset(Ds, 0, sizeof(T) * EB);
            memset(h, 0, sizeof(T) * (size_t)(N * EB));
            for (int64_t s = 0; s < L; ++s) {
                const int64_t t = reverse ? L - 1 - s : s, row = (b * L + t) * E + e0;
                if (s + CL_PF < L) {
                    const int64_t tp = reverse ? L - 1 - (s + CL_PF) : s + CL_PF, rp = (b * L + tp) * E + e0;
                    CL_PREFETCH_ROW(u + rp, 0);
                    CL_PREFETCH_ROW(out + rp, 1);
                    if (z) CL_PREFETCH_ROW(z + b * sz_b + tp * sz_t + e0, 0);
                    if (dsave) CL_PREFETCH_ROW(dsave + rp, 1);
                    if (z && ysave) CL_PREFETCH_ROW(ysave + rp, 1);
                    __builtin_prefetch(Bm + b * sB_b + tp * sB_t, 0, 3);
                    __builtin_prefetch(Cm + b * sC_b + tp * sC_t, 0, 3);
                    if (dtw) __builtin_prefetch(dt + b * sdt_b + tp * sdt_t, 0, 3);
                    else CL_PREFETCH_ROW(delta + rp, 0);
                }
                CL_LOAD(T, uu, u + row, ne);
                if (dtw) { /* dt_proj fused (the mixer): d, du from dt in one pass (scan_steps.h) */
                    CL_FN(sl_delta_row)(dt + b * sdt_b + t * sdt_t, R, wb, bs, uu, d, du, softplus);
                } else {
                    CL_LOAD(T, dl, delta + row, ne);
                    /* branch outside the loops: a flag read inside defeats vectorisation */
                    if (softplus) {
                        CL_FN(sl_softplus_row)(dl, bs, d); /* d = softplus(dl + bs) (scan_steps.h) */
                    } else {
                        #pragma omp simd
                        for (int j = 0; j < EB; ++j) d[j] = dl[j] + bs[j];
                    }
                    #pragma omp simd
                    for (int j = 0; j < EB; ++j) du[j] = d[j] * uu[j];
                }
                if (dsave) CL_STORE(T, dsave + row, d, ne); /* the backward starts from d */
                const T *Bn = Bm + b * sB_b + t * sB_t, *Cn = Cm + b * sC_b + t * sC_t;
                CL_FN(sl_fwd_states)(h, Ab, d, du, y, Bn, Cn, N); /* y = sum_n C_n h_n (scan_steps.h) */
                #pragma omp simd
                for (int j = 0; j < EB; ++j) y[j] += Ds[j] * uu[j];
                if (ysave) CL_STORE(T, ysave + row, y, ne); /* dz needs it, ungated */
                if (accumulate == 2) { /* out's row (the mixer's first direction, ungated) added first */
                    CL_LOAD(T, dl, out + row, ne);
                    #pragma omp simd
                    for (int j = 0; j < EB; ++j) y[j] += dl[j];
                }
                if (z) {
                    CL_LOAD(T, zz, z + b * sz_b + t * sz_t + e0, ne);
                    CL_FN(sl_gate_row)(y, zz, os); /* y z sigmoid(z) os (scan_steps.h) */
                } else {
                    #pragma omp simd
                    for (int j = 0; j < EB; ++j) y[j] *= os;
                }
                CL_STORE_ACC(T, out + row, y, ne, accumulate == 1);
            }
        }
        SM_FTZ_END
        free(buf);
    }
    free(xwt);
    free(lay);
    return failed;
}

/* du, ddelta: (batch, L, E) contiguous; dz (batch, L, E) strided (sdz_b, sdz_t), written, or
 * added to with acc_dz. A: (E, N). The parameter gradients, each in its parameter's layout, written
 * (summed over the threads' partial sums here, cl_reduce_block): dA_out (E, N), dD_out (E), dbias_out
 * (E) (the sum of ddelta over time, so no pass over ddelta after), with dtpw (dt_proj's weight, (E, R))
 * ddtw_out (E, R);
 * dB_out, dC_out: (batch, L, N), ddt (batch, L, R), contiguous: written; a sample's channel
 * blocks run in sequence on one thread, the first zeroes the sample's rows and each adds its share.
 * With xw, x_proj's weight (R + 2N, E) (the mixer: u = x_proj's input, [dt | B | C] its output,
 * dt_proj fused), x_proj's backward runs here too, per sample once its channel blocks are done:
 * [ddt | dB | dC] go to a per-thread (L, R + 2N) buffer instead of dB_out / dC_out / ddt (unused),
 * du gets [ddt | dB | dC] xw added and dxw_out (R + 2N, E) = [..]^T u. Two
 * matmuls a direction fewer; in a training step they ran at 70-90 GFLOP/s, their (batch L, 22) x
 * (22, 192) shapes too skinny for the BLAS (Intel Xeon, the demo's size).
 * With cx as well, the conv's (cv_bwd's) backward follows for the sample, du being its output
 * gradient (u = silu(conv(cx)), cw (E, K)): du stays in a per-thread (L, E) buffer (du_out unused), the
 * conv's dx goes to cdx (strided, added to with cacc), its weight gradient to cdw_out (E, K) and its
 * bias gradient to cdb_out (E; NULL: not wanted) */
int CL_FN(sl_bwd)(const T *CL_RESTRICT u, const T *CL_RESTRICT dsv, const T *CL_RESTRICT ysv,
                 const T *CL_RESTRICT A,
                 const T *Bm, int64_t sB_b, int64_t sB_t, const T *Cm, int64_t sC_b,
                 int64_t sC_t, const T *CL_RESTRICT D, const T *z, int64_t sz_b, int64_t sz_t,
                 const T *CL_RESTRICT gout, T *CL_RESTRICT du_out,
                 T *CL_RESTRICT ddelta, T *dz, int64_t sdz_b, int64_t sdz_t, int acc_dz,
                 T *CL_RESTRICT dA_out, T *CL_RESTRICT dD_out, T *CL_RESTRICT dbias_out,
                 T *CL_RESTRICT ddtw_out, T *CL_RESTRICT dxw_out, T *CL_RESTRICT cdw_out,
                 T *CL_RESTRICT cdb_out, T *CL_RESTRICT dB_out, T *CL_RESTRICT dC_out,
                 int64_t batch, int64_t E, int64_t L, int64_t N, int softplus, int reverse,
                 double oscale, const T *dt, int64_t sdt_b, int64_t sdt_t,
                 const T *CL_RESTRICT dtpw, int64_t R, T *CL_RESTRICT ddt,
                 const T *CL_RESTRICT xw, const T *cx, int64_t scx_b, int64_t scx_t,
                 const T *CL_RESTRICT cw, const T *CL_RESTRICT cbias, int64_t K, T *cdx,
                 int64_t scdx_b, int64_t scdx_t, int cacc,
                 int nthreads) {
    int failed = 0;
    const int64_t nblk = (E + EB - 1) / EB;
    if (!dtpw) R = 0;
    if ((xw && !dtpw) || (cx && !xw)) return 2; /* x_proj's backward needs ddt, the conv's all of du */
    const int64_t J = R + 2 * N; /* x_proj's outputs */
    /* a thread's row of partial sums: dA (N, E) | dD | dbias | ddtw (R, E) (| dxw (J, E) (| conv dw (K, E) | db)) */
    const int64_t P = (N + 2 + R) * E + (xw ? J * E : 0) + (cx ? (K + 1) * E : 0);
    T *parts = (T *)calloc((size_t)nthreads * (size_t)P, sizeof(T));
    T *At, *dtw, *cwt, *lay = CL_FN(sl_weights_t)(A, dtpw, cx ? cw : NULL, E, N, R, K, &At, &dtw, &cwt);
    if (!parts || !lay) {
        free(parts);
        free(lay);
        return 1;
    }
    const T os = (T)oscale; /* gout is the gradient of oscale * y */
    #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        SM_FTZ_BEGIN
        /* hs: (L+1) x G x EB states h_{s-1} (row 0 zero) of a group of G of the N states; as: */
        /* (L+1) x G x EB decays, row L zero; per-step rows (L x EB) of d, sigmoid(x), gy, u, */
        /* d*u, dd, sgB, y, dz's factor; then N x EB g, dA, A. */
        const int64_t G = sm_state_group(N, L, (int64_t)sizeof(T));
        const size_t rows = (size_t)(L + 1) * (size_t)(G * EB);
        /* with dtw: R x EB rows of dtw and of its gradient */
        const int64_t tid = CL_THREAD_NUM(); /* this thread's row of parts */
        /* with xw: an EB row, L x EB rows of u, J x EB of dxw, x_proj's weight as nblk blocks of
         * J x EB (loaded once), then the sample's (L, J) rows of [ddt | dB | dC] */
        const size_t base = 2 * rows + 9 * (size_t)(L * EB) + 3 * (size_t)(N * EB) + 6 * EB + 2 * (size_t)(R * EB);
        const size_t xsz = xw ? (size_t)((1 + L + J + nblk * J) * EB + L * J) : 0;
        /* with cx: the sample's du rows and the conv's gpre rows, L x E each */
        const size_t csz = cx ? 2 * (size_t)(L * E) : 0;
        T *buf = (T *)sm_aligned_malloc(sizeof(T) * (base + xsz + csz));
        T *CL_RESTRICT cdu = buf && cx ? buf + base + xsz : NULL, *CL_RESTRICT cgpre = cdu ? cdu + L * E : NULL;
        T *CL_RESTRICT xacc = buf && xw ? buf + base : NULL, *CL_RESTRICT xus = xacc ? xacc + EB : NULL;
        T *CL_RESTRICT xdw = xus ? xus + L * EB : NULL, *CL_RESTRICT xwb = xdw ? xdw + J * EB : NULL;
        T *CL_RESTRICT xg = xwb ? xwb + nblk * J * EB : NULL;
        if (xwb)
            for (int64_t blk = 0; blk < nblk; ++blk) {
                const int64_t e0 = blk * EB, ne = E - e0 < EB ? E - e0 : EB;
                for (int64_t j = 0; j < J; ++j) CL_LOAD(T, xwb + (blk * J + j) * EB, xw + j * E + e0, ne);
            }
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; ++b) {
            if (!buf) continue;
            /* where this sample's [ddt | dB | dC] rows go: xg with x_proj's backward, else the outputs */
            T *const dBb = xw ? xg + R : dB_out + b * L * N, *const dCb = xw ? xg + R + N : dC_out + b * L * N;
            T *const ddtb = xw ? xg : (dtw ? ddt + b * L * R : NULL);
            const int64_t sbc = xw ? J : N, sdd = xw ? J : R; /* their row strides */
            T *const dub = cx ? cdu : du_out + b * L * E; /* the sample's du rows */
            for (int64_t t = 0; t < L; ++t) {
                memset(dBb + t * sbc, 0, sizeof(T) * (size_t)N);
                memset(dCb + t * sbc, 0, sizeof(T) * (size_t)N);
                if (dtw) memset(ddtb + t * sdd, 0, sizeof(T) * (size_t)R);
            }
            for (int64_t blk = 0; blk < nblk; ++blk) {
                T *CL_RESTRICT hs = buf, *CL_RESTRICT as = buf + rows;
                T *CL_RESTRICT ds = as + rows, *CL_RESTRICT sgs = ds + L * EB;
                T *CL_RESTRICT gys = sgs + L * EB, *CL_RESTRICT us = gys + L * EB;
                T *CL_RESTRICT dus = us + L * EB, *CL_RESTRICT dds = dus + L * EB;
                T *CL_RESTRICT sgBs = dds + L * EB;
                /* without ysave: the replay's y = sum_n C_n h_n and dz's factor, per step */
                T *CL_RESTRICT yrs = sgBs + L * EB, *CL_RESTRICT dzfs = yrs + L * EB;
                T *CL_RESTRICT g = dzfs + L * EB, *CL_RESTRICT dAa = g + N * EB, *CL_RESTRICT Ab = dAa + N * EB;
                T *CL_RESTRICT bs = Ab + N * EB, *CL_RESTRICT Ds = bs + EB, *CL_RESTRICT y = Ds + EB;
                T *CL_RESTRICT go = y + EB, *CL_RESTRICT zz = go + EB, *CL_RESTRICT szs = zz + EB;
                T *CL_RESTRICT wb = szs + EB, *CL_RESTRICT dwb = wb + R * EB;
                const int64_t e0 = blk * EB;
                const int64_t ne = E - e0 < EB ? E - e0 : EB;
                if (dtw) {
                    for (int64_t r = 0; r < R; ++r) CL_LOAD(T, wb + r * EB, dtw + r * E + e0, ne);
                    memset(dwb, 0, sizeof(T) * (size_t)(R * EB));
                }
                CL_LOAD_A_LOG2E(T, Ab, At, N, E, e0, ne); /* pass 2 scales its sum over A by ln 2 */
                if (D) CL_LOAD(T, Ds, D + e0, ne); else memset(Ds, 0, sizeof(T) * EB);
                memset(g, 0, sizeof(T) * (size_t)(N * EB));
                memset(dAa, 0, sizeof(T) * (size_t)(N * EB));
                T dDacc[EB], dbacc[EB];
                #pragma omp simd
                for (int j = 0; j < EB; ++j) dDacc[j] = dbacc[j] = (T)0;
                /* pass 1, in processing order: first the per-step rows both recurrences read (d,
                 * sigmoid'(delta), gy, u, d u) and dz, dD, none of which needs the states; then the
                 * replay of the forward's states for dC and the reverse pass */
                for (int64_t s = 0; s < L; ++s) {
                    const int64_t t = reverse ? L - 1 - s : s, row = (b * L + t) * E + e0;
                    T *CL_RESTRICT d = ds + s * EB, *CL_RESTRICT sg = sgs + s * EB;
                    T *CL_RESTRICT gy = gys + s * EB, *CL_RESTRICT uu = us + s * EB;
                    T *CL_RESTRICT du = dus + s * EB;
                    if (s + CL_PF < L) {
                        const int64_t tp = reverse ? L - 1 - (s + CL_PF) : s + CL_PF, rp = (b * L + tp) * E + e0;
                        CL_PREFETCH_ROW(u + rp, 0);
                        CL_PREFETCH_ROW(dsv + rp, 0);
                        CL_PREFETCH_ROW(gout + rp, 0);
                        if (z) CL_PREFETCH_ROW(z + b * sz_b + tp * sz_t + e0, 0);
                        if (z && ysv) {
                            CL_PREFETCH_ROW(ysv + rp, 0);
                            CL_PREFETCH_ROW(dz + b * sdz_b + tp * sdz_t + e0, 1);
                        }
                    }
                    CL_LOAD(T, uu, u + row, ne);
                    CL_LOAD(T, d, dsv + row, ne);
                    CL_LOAD(T, go, gout + row, ne);
                    #pragma omp simd
                    for (int j = 0; j < EB; ++j) go[j] *= os;
                    /* softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x)): no log1p here */
                    if (softplus) {
                        CL_FN(sl_dsoftplus_row)(d, sg); /* -expm1(-d) (scan_steps.h) */
                    } else {
                        #pragma omp simd
                        for (int j = 0; j < EB; ++j) sg[j] = (T)1;
                    }
                    /* d*u once per step: both passes multiply it by a scalar per state */
                    #pragma omp simd
                    for (int j = 0; j < EB; ++j) du[j] = d[j] * uu[j];
                    if (z) {
                        /* sigmoid(z) once: the gate (gy) and its derivative (dz) both use it */
                        CL_LOAD(T, zz, z + b * sz_b + t * sz_t + e0, ne);
                        CL_FN(sl_sigmoid_row)(zz, szs); /* scan_steps.h */
                        #pragma omp simd
                        for (int j = 0; j < EB; ++j) gy[j] = go[j] * zz[j] * szs[j];
                    } else {
                        #pragma omp simd
                        for (int j = 0; j < EB; ++j) gy[j] = go[j];
                    }
                    if (z && !ysv) { /* dz = its factor here times y + D u, once the replay has y */
                        T *CL_RESTRICT dzf = dzfs + s * EB;
                        #pragma omp simd
                        for (int j = 0; j < EB; ++j) dzf[j] = go[j] * szs[j] * ((T)1 + zz[j] * ((T)1 - szs[j]));
                    } else if (z) { /* dz from the forward's ysave, not the states */
                        CL_LOAD(T, y, ysv + row, ne);
                        #pragma omp simd
                        for (int j = 0; j < EB; ++j) {
                            const T sz = szs[j];
                            y[j] = go[j] * y[j] * sz * ((T)1 + zz[j] * ((T)1 - sz));
                        }
                        CL_STORE_ACC(T, dz + b * sdz_b + t * sdz_t + e0, y, ne, acc_dz);
                    }
                    #pragma omp simd
                    for (int j = 0; j < EB; ++j) dDacc[j] += gy[j] * uu[j];
                }
                /* the two recurrences for one group of G states after the other (sm_state_group):
                 * the per-step sums over the states (y, dd, sgB) add up over the groups */
                for (int64_t n0 = 0; n0 < N; n0 += G) {
                    const int64_t Gn = N - n0 < G ? N - n0 : G, SN = Gn * EB; /* states, a history row */
                    memset(hs, 0, sizeof(T) * (size_t)SN);
                    memset(as + (size_t)L * SN, 0, sizeof(T) * (size_t)SN);
                    /* the replay, on its own: h for dC and the reverse pass, and with a gate but no
                     * ysave also y = sum_n C_n h_n for dz (the forward then writes and the backward
                     * reads one (batch, L, E) tensor less) */
                    for (int64_t s = 0; s < L; ++s) {
                        const int64_t t = reverse ? L - 1 - s : s;
                        if (s + CL_PF < L) {
                            const int64_t tp = reverse ? t - CL_PF : t + CL_PF;
                            __builtin_prefetch(Bm + b * sB_b + tp * sB_t, 0, 3);
                            if (z && !ysv) __builtin_prefetch(Cm + b * sC_b + tp * sC_t, 0, 3);
                        }
                        const T *Bn = Bm + b * sB_b + t * sB_t + n0;
                        if (z && !ysv)
                            CL_FN(sl_replay_states_y)(hs + s * SN, hs + (s + 1) * SN, as + s * SN, Ab + n0 * EB, ds + s * EB,
                                                     dus + s * EB, gys + s * EB, Bn, Cm + b * sC_b + t * sC_t + n0,
                                                     dCb + t * sbc + n0, yrs + s * EB, Gn, n0 > 0);
                        else
                            CL_FN(sl_replay_states)(hs + s * SN, hs + (s + 1) * SN, as + s * SN, Ab + n0 * EB, ds + s * EB,
                                                   dus + s * EB, gys + s * EB, Bn, dCb + t * sbc + n0, Gn);
                    }
                    /* pass 2: reverse recurrence for g = dL/dh, the adjoint state loops alone; each
                     * step's sums over the states (dd raw, sgB) go to its rows of dds / sgBs */
                    for (int64_t s = L - 1; s >= 0; --s) {
                        const int64_t t = reverse ? L - 1 - s : s;
                        const T *Bn = Bm + b * sB_b + t * sB_t + n0, *Cn = Cm + b * sC_b + t * sC_t + n0;
                        if (s - CL_PF >= 0) {
                            const int64_t tp = reverse ? L - 1 - (s - CL_PF) : s - CL_PF;
                            __builtin_prefetch(Bm + b * sB_b + tp * sB_t, 0, 3);
                            __builtin_prefetch(Cm + b * sC_b + tp * sC_t, 0, 3);
                        }
                        /* dd = sum_n ga_n A_n, sgB = sum_n g_n B_n; g, dA, dB updated (scan_steps.h) */
                        CL_FN(sl_adjoint_states)(hs + s * SN, as + s * SN, as + (s + 1) * SN, Ab + n0 * EB, ds + s * EB,
                                                dus + s * EB, gys + s * EB, Bn, Cn, g + n0 * EB, dAa + n0 * EB,
                                                dds + s * EB, sgBs + s * EB, dBb + t * sbc + n0, Gn, n0 > 0);
                    }
                } /* state group */
                /* du and d(delta) from the sums of pass 2, step by step, off its recurrence. Run
                 * between two steps' state loops this work cost far more than
                 * on its own: dt_proj's gradients ~2.2 of the scan backward's 13 ms at the D 192
                 * shape where a C harness times them at a third of that (Intel Xeon, scratch
                 * probes); taking them and this epilogue out of the loop made the backward 1.11x
                 * faster there. The same split of the forward (chunks of steps) did not pay. */
                for (int64_t s = 0; s < L; ++s) {
                    const int64_t t = reverse ? L - 1 - s : s, row = (b * L + t) * E + e0;
                    if (s + CL_PF < L) {
                        const int64_t tp = reverse ? L - 1 - (s + CL_PF) : s + CL_PF, rp = (b * L + tp) * E + e0;
                        CL_PREFETCH_ROW(dub + tp * E + e0, 1);
                        if (ddelta) CL_PREFETCH_ROW(ddelta + rp, 1);
                        if (z && !ysv) CL_PREFETCH_ROW(dz + b * sdz_b + tp * sdz_t + e0, 1);
                    }
                    const T *CL_RESTRICT d = ds + s * EB, *CL_RESTRICT sg = sgs + s * EB;
                    const T *CL_RESTRICT gy = gys + s * EB, *CL_RESTRICT uu = us + s * EB;
                    const T *CL_RESTRICT sgB = sgBs + s * EB;
                    T *CL_RESTRICT dd = dds + s * EB;
                    #pragma omp simd
                    for (int j = 0; j < EB; ++j) {
                        y[j] = d[j] * sgB[j] + gy[j] * Ds[j];
                        dd[j] = (dd[j] * (T)SM_LN2_D + uu[j] * sgB[j]) * sg[j];
                        dbacc[j] += dd[j]; /* the bias gradient: the sum of ddelta over time */
                    }
                    CL_STORE(T, dub + t * E + e0, y, ne);
                    if (ddelta) CL_STORE(T, ddelta + row, dd, ne);
                    if (z && !ysv) { /* dz = factor (y + D u), into zz as scratch */
                        const T *CL_RESTRICT dzf = dzfs + s * EB, *CL_RESTRICT yr = yrs + s * EB;
                        #pragma omp simd
                        for (int j = 0; j < EB; ++j) zz[j] = dzf[j] * (yr[j] + Ds[j] * uu[j]);
                        CL_STORE_ACC(T, dz + b * sdz_b + t * sdz_t + e0, zz, ne, acc_dz);
                    }
                    if (dtw) CL_FN(sl_dtproj_ddt)(dd, R, wb, ddtb + t * sdd); /* ddt += dtw dd */
                }
                if (dtw) /* ddtw += dd dt^T over the block's steps (scan_steps.h) */
                    CL_FN(sl_dtproj_dw)(dds, dt + b * sdt_b + (reverse ? (L - 1) * sdt_t : 0),
                                       reverse ? -sdt_t : sdt_t, L, R, dwb);
                /* into this thread's row of parts, summed over the threads below, not over the
                 * batch (a (batch, N, E) buffer and its reduction per call, before). The sums'
                 * rounding depends on the thread count (bit-identical for a given count) */
                T *mine = parts + tid * P;
                for (int64_t n = 0; n < N; ++n) CL_ADD_ROW(mine + n * E + e0, dAa + n * EB, ne);
                CL_ADD_ROW(mine + N * E + e0, dDacc, ne);
                CL_ADD_ROW(mine + (N + 1) * E + e0, dbacc, ne);
                for (int64_t r = 0; r < R; ++r) CL_ADD_ROW(mine + (N + 2 + r) * E + e0, dwb + r * EB, ne);
            } /* channel block */
            if (xw) { /* x_proj's backward for sample b: its rows of [ddt | dB | dC] are complete now */
                T *mine = parts + tid * P + (N + 2 + R) * E;
                for (int64_t blk = 0; blk < nblk; ++blk) {
                    const int64_t e0 = blk * EB, ne = E - e0 < EB ? E - e0 : EB;
                    for (int64_t t = 0; t < L; ++t) { /* du += [ddt | dB | dC] W (scan_steps.h) */
                        const int64_t row = (b * L + t) * E + e0;
                        CL_LOAD(T, xacc, dub + t * E + e0, ne);
                        CL_FN(sl_rowmat_add)(xg + t * J, J, xwb + blk * J * EB, xacc);
                        CL_STORE(T, dub + t * E + e0, xacc, ne);
                        CL_LOAD(T, xus + t * EB, u + row, ne);
                    }
                    memset(xdw, 0, sizeof(T) * (size_t)(J * EB)); /* dW_j += sum_t [..]_(t, j) u_t */
                    CL_FN(sl_dtproj_dw)(xus, xg, J, L, J, xdw);
                    for (int64_t j = 0; j < J; ++j) CL_ADD_ROW(mine + j * E + e0, xdw + j * EB, ne);
                }
            }
            if (cx) { /* the conv's backward for sample b, from its du rows (cv_bwd_sample) */
                T *cdw = parts + tid * P + (N + 2 + R + J) * E;
                CL_FN(cv_bwd_sample)(cx + b * scx_b, scx_t, cwt, cbias, cdu, cdx + b * scdx_b, scdx_t, cacc, cdw,
                                    cdw + K * E, cgpre, E, L, K, reverse);
            }
        } /* sample */
        CL_FN(cl_reduce_block)(dA_out, parts, P, 0, N, E, 1, nthreads);
        CL_FN(cl_reduce_block)(dD_out, parts, P, N * E, 1, E, 0, nthreads);
        CL_FN(cl_reduce_block)(dbias_out, parts, P, (N + 1) * E, 1, E, 0, nthreads);
        if (dtw) CL_FN(cl_reduce_block)(ddtw_out, parts, P, (N + 2) * E, R, E, 1, nthreads);
        if (xw) CL_FN(cl_reduce_block)(dxw_out, parts, P, (N + 2 + R) * E, J, E, 0, nthreads);
        if (cx) CL_FN(cl_reduce_block)(cdw_out, parts, P, (N + 2 + R + J) * E, K, E, 1, nthreads);
        if (cx && cdb_out) CL_FN(cl_reduce_block)(cdb_out, parts, P, (N + 2 + R + J + K) * E, 1, E, 0, nthreads);
        SM_FTZ_END
        free(buf);
    }
    free(parts);
    free(lay);
    return failed;
}
