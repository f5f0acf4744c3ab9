/*
 * The generic state loops and row functions of scan_steps.h for one element type: plain loops that
 * the compiler vectorises (`omp simd`) for whatever vectors the target has (AVX2, AVX-512, NEON, SSE).
 * Included once per type: scan_steps.h defines T, SFX (CL_FN(name) is name_SFX) and the type's
 * EXP2 (2^x), EXP, SOFTPLUS and EXPM1 before each #include. No include guard, on purpose.
 */
static inline void CL_FN(sl_fwd_states)(T *CL_RESTRICT h, const T *CL_RESTRICT Ab,
                                       const T *CL_RESTRICT d, const T *CL_RESTRICT du,
                                       T *CL_RESTRICT y, const T *Bn, const T *Cn, int64_t N) {
    #pragma omp simd
    for (int j = 0; j < EB; ++j) y[j] = (T)0;
    /* one state per pass: pairing states (y loaded / stored once per two) cost more loop
     * overhead than it saved (counted with valgrind: +0.9% instructions, AVX2 build) */
    for (int64_t n = 0; n < N; ++n) {
        const T bn = Bn[n], cn = Cn[n];
        T *CL_RESTRICT hn = h + n * EB;
        const T *CL_RESTRICT an = Ab + n * EB;
        #pragma omp simd
        for (int j = 0; j < EB; ++j) {
            hn[j] = EXP2(d[j] * an[j]) * hn[j] + du[j] * bn;
            y[j] += cn * hn[j];
        }
    }
}
/* hp: N x EB states before the step, hc: after it, ac: N x EB decays; dC: N sums; with with_y
 * also y = sum_n C_n h_n of the step (for dz when the forward kept no ysave), added to y with
 * add_y (sl_bwd's later groups of states). with_y is a constant at both wrappers' calls, so
 * each inlined copy keeps only its own loop body */
static inline void CL_FN(sl_replay_worker)(const T *CL_RESTRICT hp, T *CL_RESTRICT hc,
                                          T *CL_RESTRICT ac, const T *CL_RESTRICT Ab,
                                          const T *CL_RESTRICT d, const T *CL_RESTRICT du,
                                          const T *CL_RESTRICT gy, const T *Bn, const T *Cn,
                                          T *dC, T *CL_RESTRICT y, int64_t N, const int with_y,
                                          int add_y) {
    T yl[EB];
    #pragma omp simd
    for (int j = 0; j < EB; ++j) yl[j] = with_y && add_y ? y[j] : (T)0;
    for (int64_t n = 0; n < N; ++n) {
        const T bn = Bn[n], cn = with_y ? Cn[n] : (T)0;
        const int64_t o = n * EB;
        T dc = (T)0;
        #pragma omp simd reduction(+ : dc)
        for (int j = 0; j < EB; ++j) {
            const T a = EXP2(d[j] * Ab[o + j]), hv = a * hp[o + j] + du[j] * bn;
            ac[o + j] = a;
            hc[o + j] = hv;
            dc += gy[j] * hv;
            if (with_y) yl[j] += cn * hv;
        }
        dC[n] += dc;
    }
    if (with_y)
        #pragma omp simd
        for (int j = 0; j < EB; ++j) y[j] = yl[j];
}
static inline void CL_FN(sl_replay_states)(const T *CL_RESTRICT hp, T *CL_RESTRICT hc,
                                          T *CL_RESTRICT ac, const T *CL_RESTRICT Ab,
                                          const T *CL_RESTRICT d, const T *CL_RESTRICT du,
                                          const T *CL_RESTRICT gy, const T *Bn, T *dC,
                                          int64_t N) {
    CL_FN(sl_replay_worker)(hp, hc, ac, Ab, d, du, gy, Bn, Bn, dC, NULL, N, 0, 0);
}
static inline void CL_FN(sl_replay_states_y)(const T *CL_RESTRICT hp, T *CL_RESTRICT hc,
                                            T *CL_RESTRICT ac, const T *CL_RESTRICT Ab,
                                            const T *CL_RESTRICT d, const T *CL_RESTRICT du,
                                            const T *CL_RESTRICT gy, const T *Bn, const T *Cn,
                                            T *dC, T *CL_RESTRICT y, int64_t N, int add_y) {
    CL_FN(sl_replay_worker)(hp, hc, ac, Ab, d, du, gy, Bn, Cn, dC, y, N, 1, add_y);
}
/* pass 2 of the backward, one step in reverse: g_n = gy C_n + a'_n g_n (a' the next step's
 * decays), ga = g_n a_n h_{s-1}; dd = sum_n ga A_n and sgB = sum_n g_n B_n (written), dA_n +=
 * ga d, dB_n = sum over the block of g_n (d u). hp: N x EB states before the step, ac / ax:
 * this / the next step's decays. With add, dd and sgB are added to (sl_bwd's later groups of
 * states). States in pairs: dd, sgB (and d, du, gy) loaded and stored once per pair */
static inline void CL_FN(sl_adjoint_states)(
    const T *CL_RESTRICT hp, const T *CL_RESTRICT ac, const T *CL_RESTRICT ax,
    const T *CL_RESTRICT Ab, const T *CL_RESTRICT d, const T *CL_RESTRICT du,
    const T *CL_RESTRICT gy, const T *Bn, const T *Cn, T *CL_RESTRICT g, T *CL_RESTRICT dA,
    T *CL_RESTRICT dd, T *CL_RESTRICT sgB, T *dB, int64_t N, int add) {
    if (!add)
        #pragma omp simd
        for (int j = 0; j < EB; ++j) dd[j] = sgB[j] = (T)0;
    int64_t n = 0;
    for (; n + 1 < N; n += 2) {
        const T b0 = Bn[n], c0 = Cn[n], b1 = Bn[n + 1], c1 = Cn[n + 1];
        const int64_t o0 = n * EB, o1 = o0 + EB;
        T db0 = (T)0, db1 = (T)0;
        #pragma omp simd reduction(+ : db0, db1)
        for (int j = 0; j < EB; ++j) {
            const T gv0 = gy[j] * c0 + ax[o0 + j] * g[o0 + j];
            const T gv1 = gy[j] * c1 + ax[o1 + j] * g[o1 + j];
            g[o0 + j] = gv0;
            g[o1 + j] = gv1;
            const T ga0 = gv0 * hp[o0 + j] * ac[o0 + j], ga1 = gv1 * hp[o1 + j] * ac[o1 + j];
            dd[j] += ga0 * Ab[o0 + j] + ga1 * Ab[o1 + j];
            dA[o0 + j] += ga0 * d[j];
            dA[o1 + j] += ga1 * d[j];
            sgB[j] += gv0 * b0 + gv1 * b1;
            db0 += gv0 * du[j];
            db1 += gv1 * du[j];
        }
        dB[n] += db0;
        dB[n + 1] += db1;
    }
    for (; n < N; ++n) { /* odd N: the last state alone */
        const T bn = Bn[n], cn = Cn[n];
        const int64_t o = n * EB;
        T db = (T)0;
        #pragma omp simd reduction(+ : db)
        for (int j = 0; j < EB; ++j) {
            const T gv = gy[j] * cn + ax[o + j] * g[o + j];
            g[o + j] = gv;
            const T ga = gv * hp[o + j] * ac[o + j];
            dd[j] += ga * Ab[o + j];
            dA[o + j] += ga * d[j];
            sgB[j] += gv * bn;
            db += gv * du[j];
        }
        dB[n] += db;
    }
}
/* dt_proj's input gradient at one step: ddt_r += sum over the block of dd W_r (R lane sums) */
static inline void CL_FN(sl_dtproj_ddt)(const T *CL_RESTRICT dd, int64_t R, const T *CL_RESTRICT wb,
                                       T *ddt) {
    for (int64_t r = 0; r < R; ++r) {
        T acc = (T)0;
        #pragma omp simd reduction(+ : acc)
        for (int j = 0; j < EB; ++j) acc += dd[j] * wb[r * EB + j];
        ddt[r] += acc;
    }
}
/* a 32-byte vector of T (8 floats, 4 doubles; GCC / Clang vector extensions, one or two registers on
 * every target): the register-blocked products below hold their accumulators in these */
typedef T CL_FN(xv) __attribute__((vector_size(32)));
static inline CL_FN(xv) CL_FN(xv_load)(const T *p) {
    CL_FN(xv) v;
    memcpy(&v, p, sizeof v); /* an unaligned vector load */
    return v;
}
/* x_proj over a sample's L rows of u (L x E): out (L x J) = u W^T with wt = W^T zero-padded to
 * (E, JP) columns (JP a multiple of 16 >= J), four rows at a time */
static inline void CL_FN(sl_xproj_rows)(const T *CL_RESTRICT u, int64_t L, int64_t E,
                                       const T *CL_RESTRICT wt, int64_t J, int64_t JP,
                                       T *CL_RESTRICT out) {
    /* two 32-byte vectors of columns of the four rows stay in registers across E (8 AVX2 registers;
     * plain arrays the compiler keeps on the stack), so each channel costs 4 broadcasts, 2 vector
     * loads of W^T and 8 vector FMAs, no load and store of an accumulator row. Each output is still
     * summed over e in order with one FMA per term, as in the plain product */
    enum { XV = 32 / sizeof(T), XB = 2 * XV }; /* lanes a vector, columns a pass */
    for (int64_t t0 = 0; t0 < L; t0 += 4) {
        const int64_t nt = L - t0 < 4 ? L - t0 : 4;
        /* rows past L repeat the last one: computed, not stored */
        const T *u0 = u + t0 * E, *u1 = u + (t0 + (nt > 1)) * E;
        const T *u2 = u + (t0 + (nt > 2 ? 2 : nt - 1)) * E, *u3 = u + (t0 + nt - 1) * E;
        for (int64_t j0 = 0; j0 < JP; j0 += XB) { /* JP: a multiple of 16, so of XB */
            CL_FN(xv) a0 = {0}, b0 = {0}, a1 = {0}, b1 = {0}, a2 = {0}, b2 = {0}, a3 = {0}, b3 = {0};
            for (int64_t e = 0; e < E; ++e) {
                const CL_FN(xv) wa = CL_FN(xv_load)(wt + e * JP + j0), wb = CL_FN(xv_load)(wt + e * JP + j0 + XV);
                const T v0 = u0[e], v1 = u1[e], v2 = u2[e], v3 = u3[e];
                a0 += v0 * wa, b0 += v0 * wb;
                a1 += v1 * wa, b1 += v1 * wb;
                a2 += v2 * wa, b2 += v2 * wb;
                a3 += v3 * wa, b3 += v3 * wb;
            }
            const int64_t nj = J - j0 < XB ? J - j0 : XB;
            const CL_FN(xv) *rows[4][2] = {{&a0, &b0}, {&a1, &b1}, {&a2, &b2}, {&a3, &b3}};
            for (int64_t r = 0; r < nt; ++r)
                for (int64_t j = 0; j < nj; ++j) out[(t0 + r) * J + j0 + j] = (*rows[r][j / XV])[j % XV];
        }
    }
}
/* row += sum_j g_j W_j over a block (W: J x EB rows): x_proj's input gradient at one step */
static inline void CL_FN(sl_rowmat_add)(const T *g, int64_t J, const T *CL_RESTRICT wb,
                                       T *CL_RESTRICT row) {
    for (int64_t j = 0; j < J; ++j) {
        const T v = g[j];
        #pragma omp simd
        for (int i = 0; i < EB; ++i) row[i] += v * wb[j * EB + i];
    }
}
/* dt_proj's weight gradient over a block's L steps: dW_r += sum_s dd_s dt_(s, r). dd: L x EB
 * rows; dt row s at dt0 + s * sdt (sdt < 0 in reverse time); dwb: R x EB rows. Also x_proj's
 * weight gradient in sl_bwd (R = J). Up to four rows by two vectors of dW stay in registers across
 * the L steps (8 independent FMA chains), where a row-at-a-time loop loads and stores dW at every
 * step; each element still adds its L terms in step order, one FMA each */
/* m (1-4, a constant at each call) rows r0.. of dW, two vectors of columns from j0 */
static inline __attribute__((always_inline)) void CL_FN(dw_pass)(const T *CL_RESTRICT dd, const T *dt0, int64_t sdt,
                                                                 int64_t L, int64_t r0, const int m, int j0,
                                                                 T *CL_RESTRICT dwb) {
    enum { XV = 32 / sizeof(T) };
    CL_FN(xv) acc[4][2];
    for (int i = 0; i < m; ++i)
        acc[i][0] = CL_FN(xv_load)(dwb + (r0 + i) * EB + j0), acc[i][1] = CL_FN(xv_load)(dwb + (r0 + i) * EB + j0 + XV);
    for (int64_t s = 0; s < L; ++s) {
        const T *dtr = dt0 + s * sdt + r0;
        const CL_FN(xv) da = CL_FN(xv_load)(dd + s * EB + j0), db = CL_FN(xv_load)(dd + s * EB + j0 + XV);
        for (int i = 0; i < m; ++i) acc[i][0] += da * dtr[i], acc[i][1] += db * dtr[i];
    }
    for (int i = 0; i < m; ++i) {
        memcpy(dwb + (r0 + i) * EB + j0, &acc[i][0], sizeof acc[i][0]);
        memcpy(dwb + (r0 + i) * EB + j0 + XV, &acc[i][1], sizeof acc[i][1]);
    }
}
static inline void CL_FN(sl_dtproj_dw)(const T *CL_RESTRICT dd, const T *dt0, int64_t sdt, int64_t L,
                                      int64_t R, T *CL_RESTRICT dwb) {
    enum { XB = 64 / sizeof(T) }; /* columns a pass: two vectors (EB: a multiple of 16) */
    for (int64_t r0 = 0; r0 < R; r0 += 4)
        for (int j0 = 0; j0 < EB; j0 += XB) {
            const int64_t m = R - r0;
            if (m >= 4) CL_FN(dw_pass)(dd, dt0, sdt, L, r0, 4, j0, dwb);
            else if (m == 3) CL_FN(dw_pass)(dd, dt0, sdt, L, r0, 3, j0, dwb);
            else if (m == 2) CL_FN(dw_pass)(dd, dt0, sdt, L, r0, 2, j0, dwb);
            else CL_FN(dw_pass)(dd, dt0, sdt, L, r0, 1, j0, dwb);
        }
}
/* the forward's step before the states, with dt_proj fused: delta = sum_r dt_r W_r (R x EB rows
 * wb), d = softplus(delta + bias) (delta + bias without softplus), du = d u, over a row of the
 * block */
static inline void CL_FN(sl_delta_row)(const T *dtr, int64_t R, const T *CL_RESTRICT wb,
                                      const T *CL_RESTRICT bs, const T *CL_RESTRICT uu,
                                      T *CL_RESTRICT d, T *CL_RESTRICT du, int softplus) {
    T dl[EB];
    #pragma omp simd
    for (int j = 0; j < EB; ++j) dl[j] = (T)0;
    CL_FN(sl_rowmat_add)(dtr, R, wb, dl);
    if (softplus) { /* branch outside the loops: a flag read inside defeats vectorisation */
        #pragma omp simd
        for (int j = 0; j < EB; ++j) d[j] = SOFTPLUS(dl[j] + bs[j]);
    } else {
        #pragma omp simd
        for (int j = 0; j < EB; ++j) d[j] = dl[j] + bs[j];
    }
    #pragma omp simd
    for (int j = 0; j < EB; ++j) du[j] = d[j] * uu[j];
}
/* d = softplus(x + bias) over a row of the block (the forward's step, before the states) */
static inline void CL_FN(sl_softplus_row)(const T *CL_RESTRICT x, const T *CL_RESTRICT bs,
                                         T *CL_RESTRICT d) {
    #pragma omp simd
    for (int j = 0; j < EB; ++j) {
        const T v = x[j] + bs[j];
        d[j] = SOFTPLUS(v);
    }
}
/* y = y z sigmoid(z) os over a row: the gate of the forward's output */
static inline void CL_FN(sl_gate_row)(T *CL_RESTRICT y, const T *CL_RESTRICT z, T os) {
    #pragma omp simd
    for (int j = 0; j < EB; ++j) y[j] = y[j] * z[j] / ((T)1 + EXP(-z[j])) * os;
}
/* s = sigmoid(z) over a row */
static inline void CL_FN(sl_sigmoid_row)(const T *CL_RESTRICT z, T *CL_RESTRICT s) {
    #pragma omp simd
    for (int j = 0; j < EB; ++j) s[j] = SM_SIGMOID(T, EXP, z[j]);
}
/* softplus'(x) = sigmoid(x) = 1 - e^-d from d = softplus(x) >= 0, as -expm1(-d) (no
 * cancellation for small d) over a row */
static inline void CL_FN(sl_dsoftplus_row)(const T *CL_RESTRICT d, T *CL_RESTRICT sg) {
    #pragma omp simd
    for (int j = 0; j < EB; ++j) sg[j] = -EXPM1(-d[j]);
}
/* the conv's SiLU over n values: o = o sigmoid(o) */
static inline void CL_FN(cl_silu_n)(T *CL_RESTRICT o, int64_t n) {
    #pragma omp simd
    for (int64_t e = 0; e < n; ++e) o[e] = o[e] / ((T)1 + EXP(-o[e]));
}
/* its backward over n values: gp holds the pre-activation p and becomes go silu'(p) = go s (1 + p (1 - s));
 * db += it. 1 - s as e^-p s for p > 0: no cancellation where s ~ 1 (the compiler's vectorised division, a
 * reciprocal and a Newton step under -ffast-math, left 1 - s a few ulp off, which p multiplied) */
static inline void CL_FN(cl_dsilu_n)(T *CL_RESTRICT gp, const T *CL_RESTRICT go, T *CL_RESTRICT db,
                                    int64_t n) {
    #pragma omp simd
    for (int64_t e = 0; e < n; ++e) {
        const T p = gp[e], ex = EXP(-p), s = (T)1 / ((T)1 + ex);
        const T oms = p > (T)0 ? ex * s : (T)1 - s; /* 1 - s; p e^-p <= 1/e: no overflow however it is associated */
        gp[e] = go[e] * s * ((T)1 + p * oms);
        db[e] += gp[e];
    }
}
/* the conv backward's first pass with registers across the steps: explicit x86 builds only */
static inline int CL_FN(cl_conv_bwd_sample)(const T *xb, int64_t sx_t, const T *wt, const T *bias,
                                           const T *go, T *dw, T *db, T *gpre, int64_t E,
                                           int64_t L, int64_t K, int reverse) {
    (void)xb, (void)sx_t, (void)wt, (void)bias, (void)go, (void)dw, (void)db, (void)gpre;
    (void)E, (void)L, (void)K, (void)reverse;
    return 0; /* not handled: the caller runs its generic loops */
}
/* one output row of the conv + SiLU in registers: explicit x86 builds only */
static inline int CL_FN(cl_conv_fwd_row)(const T *xb, int64_t sx_t, const T *wt, const T *bias, T *o,
                                        int64_t E, int64_t L, int64_t K, int64_t t, int reverse) {
    (void)xb, (void)sx_t, (void)wt, (void)bias, (void)o, (void)E, (void)L, (void)K, (void)t, (void)reverse;
    return 0; /* not handled: the caller runs its generic loops */
}
/* one row of the conv backward's dx in registers: explicit x86 builds only */
static inline int CL_FN(cl_conv_dx_row)(T *d, int acc, const T *gpre, const T *wt, int64_t E, int64_t L, int64_t K,
                                       int64_t s, int reverse) {
    (void)d, (void)acc, (void)gpre, (void)wt, (void)E, (void)L, (void)K, (void)s, (void)reverse;
    return 0; /* not handled: the caller runs its generic loops */
}
