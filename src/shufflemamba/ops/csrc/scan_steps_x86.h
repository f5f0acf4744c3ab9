/*
 * The state loops and row functions of the channel-last scans in explicit x86 vectors, the float32
 * versions of scan_steps_generic.h's functions, written once over the primitives of vec_x86.h and built
 * at the build's width: AVX-512 at 512 or 256 bits (SM_VECTOR_BITS), or AVX2 + FMA at 256 bits. y (and
 * the backward's sums over the states) stay in registers across the N states instead of a load and a
 * store per state. The exps and the other pointwise functions are in pointwise_x86.h, the conv's rows in
 * conv_steps_x86.h, both included from here. Included by scan_steps.h only.
 */
#ifndef SHUFFLEMAMBA_SCAN_STEPS_X86_H
#define SHUFFLEMAMBA_SCAN_STEPS_X86_H
#include "vec_x86.h" /* sm_vf, SM_VL and the sm_v* primitives of this build */
#define SM_SCAN_VECTOR_PATH 1
/* p[0..m) += v's first m lanes */
static inline void sm_vadd_first(float *p, sm_vf v, int m) {
    sm_vstore_n(p, sm_vadd(sm_vload_n(p, m), v), m);
}
#define SM_NV (EB / SM_VL) /* vectors per channel block */
#if EB % SM_VL != 0
#error "EB must be a multiple of the vector length"
#endif
/* Accumulators a pass over a block keeps in registers: at 512 bits all SM_NV of the block (6 at EB 96, of
 * 32 registers); AVX2's 16 registers hold 6 of its 12 (SM_CV; the adjoint keeps two arrays: SM_ACV), the
 * block then taken in passes (all 12 at once were spilled: 68 stack moves in the forward's state loop, 673
 * in the backward kernel, objdump of the AVX2 build) */
/* Pass rows: inside a pass the state loops read each array from one pointer, set to the pass's first
 * vector and stepped a state (EB floats) at a time, so that the pass's vectors are constant offsets from it.
 * Indexed from c0 inside the loop instead, gcc kept a pointer per vector and array (42 in the AVX2 replay),
 * spilled and reloaded each state: the mixer core's backward 1.04-1.05x (demo) and 1.07-1.13x (Vim-Ti)
 * faster as an AVX2 build this way, the 512-bit build (one pass) within noise (Zen 4, interleaved A/B) */
#if SM_VL == 16
#define SM_CV SM_NV
#define SM_ACV SM_NV
#else
#define SM_CV 6
#define SM_ACV 3
#endif

#include "pointwise_x86.h" /* e^x, 2^t, 1 / x, softplus and sigmoid over M vectors at once */
/* vectors a row function takes at once: a pass's (SM_CV), 6 of AVX2's 12 or the 512-bit build's 6 */
#define SM_ROWM SM_CV

/* acc (SM_CV vectors: the block's channels from vector c0) += sum_j g_j W_j (W: J x EB rows), acc in
 * registers across the J rows: dt_proj's delta in the forward, x_proj's input gradient in the backward.
 * Even and odd rows into two sets of sums: one set is SM_CV chains of J dependent FMAs (x_proj's J 44: 176
 * cycles of latency where its 264 FMAs issue in 132) */
static inline void sm_rowmat_acc(sm_vf *acc, int c0, const float *g, int64_t J, const float *CL_RESTRICT wb) {
    sm_vf odd[SM_CV];
    SM_EACH(k, SM_CV) odd[k] = sm_vzero();
    int64_t j = 0;
    for (; j + 1 < J; j += 2) {
        const sm_vf v = sm_vset1(g[j]), w = sm_vset1(g[j + 1]);
        SM_EACH(k, SM_CV) {
            if (c0 + k >= SM_NV) break;
            acc[k] = sm_vfma(v, sm_vload(wb + j * EB + (c0 + k) * SM_VL), acc[k]);
            odd[k] = sm_vfma(w, sm_vload(wb + (j + 1) * EB + (c0 + k) * SM_VL), odd[k]);
        }
    }
    if (j < J) {
        const sm_vf v = sm_vset1(g[j]);
        SM_EACH(k, SM_CV) if (c0 + k < SM_NV) acc[k] = sm_vfma(v, sm_vload(wb + j * EB + (c0 + k) * SM_VL), acc[k]);
    }
    SM_EACH(k, SM_CV) if (c0 + k < SM_NV) acc[k] = sm_vadd(acc[k], odd[k]);
}
/* as the generic one, delta in registers across the R rows of dt_proj: a load and an FMA per row
 * and vector, where the generic loop also loads and stores delta's row for each; then the pass's
 * softplus, its vectors together (past SM_NV: zeros, computed, not stored) */
static inline void sl_delta_row_f32(const float *dtr, int64_t R, const float *CL_RESTRICT wb,
                                    const float *CL_RESTRICT bs, const float *CL_RESTRICT uu,
                                    float *CL_RESTRICT d, float *CL_RESTRICT du, int softplus) {
    for (int c0 = 0; c0 < SM_NV; c0 += SM_CV) {
        sm_vf acc[SM_CV];
#pragma GCC unroll 16
        for (int k = 0; k < SM_CV; ++k) acc[k] = sm_vzero();
        sm_rowmat_acc(acc, c0, dtr, R, wb);
        SM_EACH(k, SM_CV) if (c0 + k < SM_NV) acc[k] = sm_vadd(acc[k], sm_vload(bs + (c0 + k) * SM_VL));
        if (softplus) sm_vsoftplus_m(acc, SM_CV);
        SM_EACH(k, SM_CV) {
            if (c0 + k >= SM_NV) break;
            const int j = (c0 + k) * SM_VL;
            sm_vstore(d + j, acc[k]);
            sm_vstore(du + j, sm_vmul(acc[k], sm_vload(uu + j)));
        }
    }
}
/* SM_ROWM vectors at a time, the last group's vectors past SM_NV zeros (computed, not stored) */
#define SM_ROW_GROUPS(k0) for (int k0 = 0; k0 < SM_NV; k0 += SM_ROWM)
#define SM_GROUP_LOAD(v, p, k0)                                                                    \
    do {                                                                                           \
        SM_EACH(i_, SM_ROWM) (v)[i_] = (k0) + i_ < SM_NV ? sm_vload((p) + ((k0) + i_) * SM_VL) : sm_vzero(); \
    } while (0)
#define SM_GROUP_STORE(p, v, k0)                                                                   \
    do {                                                                                           \
        SM_EACH(i_, SM_ROWM) if ((k0) + i_ < SM_NV) sm_vstore((p) + ((k0) + i_) * SM_VL, (v)[i_]); \
    } while (0)
static inline void sl_softplus_row_f32(const float *CL_RESTRICT x, const float *CL_RESTRICT bs,
                                       float *CL_RESTRICT d) {
    SM_ROW_GROUPS(k0) {
        sm_vf v[SM_ROWM], b[SM_ROWM];
        SM_GROUP_LOAD(v, x, k0);
        SM_GROUP_LOAD(b, bs, k0);
        SM_EACH(i, SM_ROWM) v[i] = sm_vadd(v[i], b[i]);
        sm_vsoftplus_m(v, SM_ROWM);
        SM_GROUP_STORE(d, v, k0);
    }
}
static inline void sl_gate_row_f32(float *CL_RESTRICT y, const float *CL_RESTRICT z, float os) {
    const sm_vf vos = sm_vset1(os);
    SM_ROW_GROUPS(k0) {
        sm_vf vz[SM_ROWM], sg[SM_ROWM], vy[SM_ROWM];
        SM_GROUP_LOAD(vz, z, k0);
        sm_vsigmoid_m(vz, sg, SM_ROWM);
        SM_GROUP_LOAD(vy, y, k0);
        SM_EACH(i, SM_ROWM) vy[i] = sm_vmul(sm_vmul(vy[i], vz[i]), sm_vmul(sg[i], vos));
        SM_GROUP_STORE(y, vy, k0);
    }
}
/* the backward's rows a vector at a time (sm_vdsilu, conv_steps_x86.h, says why) */
static inline void sl_sigmoid_row_f32(const float *CL_RESTRICT z, float *CL_RESTRICT s) {
#pragma GCC unroll 16
    for (int k = 0; k < SM_NV; ++k) sm_vstore(s + k * SM_VL, sm_vsigmoid(sm_vload(z + k * SM_VL)));
}
/* -expm1(-d) as sm_expm1f computes it: a degree-7 Taylor polynomial where |d| < 0.35 (1 - e^-d would
 * cancel), 1 - e^-d elsewhere, both computed and one selected */
static inline void sl_dsoftplus_row_f32(const float *CL_RESTRICT d, float *CL_RESTRICT sg) {
#pragma GCC unroll 16
    for (int k = 0; k < SM_NV; ++k) {
        const sm_vf x = sm_vsub(sm_vzero(), sm_vload(d + k * SM_VL)); /* expm1 at x = -d */
        sm_vf e = x;
        sm_vexp_m(&e, 1);
        sm_vf p = sm_vfma(sm_vset1(1.0f / 5040.0f), x, sm_vset1(1.0f / 720.0f));
        p = sm_vfma(p, x, sm_vset1(1.0f / 120.0f));
        p = sm_vfma(p, x, sm_vset1(1.0f / 24.0f));
        p = sm_vfma(p, x, sm_vset1(1.0f / 6.0f));
        p = sm_vfma(p, x, sm_vset1(0.5f));
        p = sm_vfma(p, sm_vmul(x, x), x);
        const sm_vf em1 = sm_vsel_gt(sm_vabs(x), sm_vset1(0.35f), sm_vsub(e, sm_vset1(1.0f)), p);
        sm_vstore(sg + k * SM_VL, sm_vsub(sm_vzero(), em1));
    }
}
#include "conv_steps_x86.h" /* the conv's rows (SiLU, forward, backward) */
static inline void sl_fwd_states_f32(float *CL_RESTRICT h, const float *CL_RESTRICT Ab,
                                     const float *CL_RESTRICT d, const float *CL_RESTRICT du,
                                     float *CL_RESTRICT y, const float *Bn, const float *Cn, int64_t N) {
    for (int c0 = 0; c0 < SM_NV; c0 += SM_CV) {
        sm_vf acc[SM_CV]; /* y of the pass's channels, in registers across the states */
#pragma GCC unroll 16
        for (int k = 0; k < SM_CV; ++k) acc[k] = sm_vzero();
        /* the pass's rows from one pointer each, stepped a state at a time (pass rows, above) */
        const float *CL_RESTRICT dp = d + c0 * SM_VL, *CL_RESTRICT dup = du + c0 * SM_VL;
        const float *CL_RESTRICT an = Ab + c0 * SM_VL;
        float *CL_RESTRICT hn = h + c0 * SM_VL;
        for (int64_t n = 0; n < N; ++n, hn += EB, an += EB) {
            const sm_vf vb = sm_vset1(Bn[n]), vc = sm_vset1(Cn[n]);
#pragma GCC unroll 16
            for (int k = 0; k < SM_CV; ++k) {
                if (c0 + k >= SM_NV) break;
                const int j = k * SM_VL;
                const sm_vf a = sm_vexp2(sm_vmul(sm_vload(dp + j), sm_vload(an + j)));
                const sm_vf hv = sm_vfma(a, sm_vload(hn + j), sm_vmul(sm_vload(dup + j), vb));
                sm_vstore(hn + j, hv);
                acc[k] = sm_vfma(vc, hv, acc[k]);
            }
        }
#pragma GCC unroll 16
        for (int k = 0; k < SM_CV; ++k)
            if (c0 + k < SM_NV) sm_vstore(y + (c0 + k) * SM_VL, acc[k]);
    }
}

/* The replay's dC and the adjoint's dB are per-state sums over the block's channels. Where the loops take
 * the block in passes (AVX2's 16 registers: 2 and 4), each state's lanes are carried across the passes in
 * an array of N vectors (padded with zeros to whole groups of SM_VL) and summed once after them, SM_VL
 * states at once (sm_vhsum_all), instead of once a pass: the mixer core's backward 1.5-3% faster at the
 * demo's shape, within noise at Vim-Ti's (Zen 4 as an AVX2 CPU). With one pass (512 bits) a state's sum
 * goes out as its pass ends: the array measured 2-8% slower there. */
#if SM_CV < SM_NV
#define SM_LANE_SUMS_LEN(N) (((N) + SM_VL - 1) / SM_VL * SM_VL)
#define SM_LANE_SUMS_DECL(name, N) sm_vf name[SM_LANE_SUMS_LEN(N)]
#define SM_LANE_SUM_START(name, n, c0) ((c0) ? (name)[n] : sm_vzero())
#define SM_LANE_SUM_END(name, n, v, out) ((name)[n] = (v))
#define SM_LANE_SUMS_FINISH(out, name, N) sm_add_lane_sums((out), (name), (N))
static inline void sm_add_lane_sums(float *out, sm_vf *lane_sums, int64_t N) {
    for (int64_t n = N; n < SM_LANE_SUMS_LEN(N); ++n) lane_sums[n] = sm_vzero();
    for (int64_t n0 = 0; n0 < N; n0 += SM_VL)
        sm_vadd_first(out + n0, sm_vhsum_all(lane_sums + n0), N - n0 < SM_VL ? (int)(N - n0) : SM_VL);
}
#else
#define SM_LANE_SUMS_DECL(name, N)
#define SM_LANE_SUM_START(name, n, c0) sm_vzero()
#define SM_LANE_SUM_END(name, n, v, out) ((out)[n] += sm_vhsum(v))
#define SM_LANE_SUMS_FINISH(out, name, N)
#endif

/* the replay, with y = sum_n C_n h_n too when with_y (a constant at both call sites below, so each
 * inlined copy keeps only its own loop body) */
static inline void sm_replay_states(const float *CL_RESTRICT hp, float *CL_RESTRICT hc, float *CL_RESTRICT ac,
                                    const float *CL_RESTRICT Ab, const float *CL_RESTRICT d,
                                    const float *CL_RESTRICT du, const float *CL_RESTRICT gy, const float *Bn,
                                    const float *Cn, float *dC, float *CL_RESTRICT y, int64_t N, const int with_y,
                                    int add_y) {
    SM_LANE_SUMS_DECL(dcs, N);
    for (int c0 = 0; c0 < SM_NV; c0 += SM_CV) {
        sm_vf acc[SM_CV]; /* y of the pass's channels, in registers across the states */
#pragma GCC unroll 16
        for (int k = 0; k < SM_CV; ++k)
            acc[k] = with_y && add_y && c0 + k < SM_NV ? sm_vload(y + (c0 + k) * SM_VL) : sm_vzero();
        const float *CL_RESTRICT dp = d + c0 * SM_VL, *CL_RESTRICT dup = du + c0 * SM_VL; /* pass rows */
        const float *CL_RESTRICT gyp = gy + c0 * SM_VL;
        const float *CL_RESTRICT ap = Ab + c0 * SM_VL, *CL_RESTRICT hpp = hp + c0 * SM_VL;
        float *CL_RESTRICT acp = ac + c0 * SM_VL, *CL_RESTRICT hcp = hc + c0 * SM_VL;
        for (int64_t n = 0; n < N; ++n, ap += EB, hpp += EB, acp += EB, hcp += EB) {
            const sm_vf vb = sm_vset1(Bn[n]), vc = with_y ? sm_vset1(Cn[n]) : sm_vzero();
            sm_vf dc = SM_LANE_SUM_START(dcs, n, c0);
#pragma GCC unroll 16
            for (int k = 0; k < SM_CV; ++k) {
                if (c0 + k >= SM_NV) break;
                const int r = k * SM_VL;
                const sm_vf a = sm_vexp2(sm_vmul(sm_vload(dp + r), sm_vload(ap + r)));
                const sm_vf hv = sm_vfma(a, sm_vload(hpp + r), sm_vmul(sm_vload(dup + r), vb));
                sm_vstore(acp + r, a);
                sm_vstore(hcp + r, hv);
                dc = sm_vfma(sm_vload(gyp + r), hv, dc);
                if (with_y) acc[k] = sm_vfma(vc, hv, acc[k]);
            }
            SM_LANE_SUM_END(dcs, n, dc, dC);
        }
        if (with_y)
#pragma GCC unroll 16
            for (int k = 0; k < SM_CV; ++k)
                if (c0 + k < SM_NV) sm_vstore(y + (c0 + k) * SM_VL, acc[k]);
    }
    SM_LANE_SUMS_FINISH(dC, dcs, N);
}
static inline void sl_replay_states_f32(const float *CL_RESTRICT hp, float *CL_RESTRICT hc,
                                        float *CL_RESTRICT ac, const float *CL_RESTRICT Ab,
                                        const float *CL_RESTRICT d, const float *CL_RESTRICT du,
                                        const float *CL_RESTRICT gy, const float *Bn, float *dC, int64_t N) {
    sm_replay_states(hp, hc, ac, Ab, d, du, gy, Bn, Bn, dC, NULL, N, 0, 0);
}
static inline void sl_replay_states_y_f32(const float *CL_RESTRICT hp, float *CL_RESTRICT hc,
                                          float *CL_RESTRICT ac, const float *CL_RESTRICT Ab,
                                          const float *CL_RESTRICT d, const float *CL_RESTRICT du,
                                          const float *CL_RESTRICT gy, const float *Bn, const float *Cn,
                                          float *dC, float *CL_RESTRICT y, int64_t N, int add_y) {
    sm_replay_states(hp, hc, ac, Ab, d, du, gy, Bn, Cn, dC, y, N, 1, add_y);
}
static inline void sl_adjoint_states_f32(const float *CL_RESTRICT hp, const float *CL_RESTRICT ac,
                                         const float *CL_RESTRICT ax, const float *CL_RESTRICT Ab,
                                         const float *CL_RESTRICT d, const float *CL_RESTRICT du,
                                         const float *CL_RESTRICT gy, const float *Bn, const float *Cn,
                                         float *CL_RESTRICT g, float *CL_RESTRICT dA, float *CL_RESTRICT dd,
                                         float *CL_RESTRICT sgB, float *dB, int64_t N, int add) {
    SM_LANE_SUMS_DECL(dbs, N);
    for (int c0 = 0; c0 < SM_NV; c0 += SM_ACV) {
        sm_vf vdd[SM_ACV], vsg[SM_ACV]; /* dd and sgB of the pass's channels, in registers across the states */
#pragma GCC unroll 16
        for (int k = 0; k < SM_ACV; ++k) {
            const int live = add && c0 + k < SM_NV;
            vdd[k] = live ? sm_vload(dd + (c0 + k) * SM_VL) : sm_vzero();
            vsg[k] = live ? sm_vload(sgB + (c0 + k) * SM_VL) : sm_vzero();
        }
        const float *CL_RESTRICT dp = d + c0 * SM_VL, *CL_RESTRICT dup = du + c0 * SM_VL; /* pass rows */
        const float *CL_RESTRICT gyp = gy + c0 * SM_VL;
        const float *CL_RESTRICT hpp = hp + c0 * SM_VL, *CL_RESTRICT acp = ac + c0 * SM_VL;
        const float *CL_RESTRICT axp = ax + c0 * SM_VL, *CL_RESTRICT ap = Ab + c0 * SM_VL;
        float *CL_RESTRICT gp = g + c0 * SM_VL, *CL_RESTRICT dAp = dA + c0 * SM_VL;
        for (int64_t n = 0; n < N; ++n, hpp += EB, acp += EB, axp += EB, ap += EB, gp += EB, dAp += EB) {
            const sm_vf vb = sm_vset1(Bn[n]), vc = sm_vset1(Cn[n]);
            sm_vf db = SM_LANE_SUM_START(dbs, n, c0);
#pragma GCC unroll 16
            for (int k = 0; k < SM_ACV; ++k) {
                if (c0 + k >= SM_NV) break;
                const int r = k * SM_VL;
                const sm_vf gv = sm_vfma(sm_vload(gyp + r), vc, sm_vmul(sm_vload(axp + r), sm_vload(gp + r)));
                sm_vstore(gp + r, gv);
                const sm_vf ga = sm_vmul(sm_vmul(gv, sm_vload(hpp + r)), sm_vload(acp + r));
                vdd[k] = sm_vfma(ga, sm_vload(ap + r), vdd[k]);
                sm_vstore(dAp + r, sm_vfma(ga, sm_vload(dp + r), sm_vload(dAp + r)));
                vsg[k] = sm_vfma(gv, vb, vsg[k]);
                db = sm_vfma(gv, sm_vload(dup + r), db);
            }
            SM_LANE_SUM_END(dbs, n, db, dB);
        }
#pragma GCC unroll 16
        for (int k = 0; k < SM_ACV; ++k) {
            if (c0 + k >= SM_NV) break;
            sm_vstore(dd + (c0 + k) * SM_VL, vdd[k]);
            sm_vstore(sgB + (c0 + k) * SM_VL, vsg[k]);
        }
    }
    SM_LANE_SUMS_FINISH(dB, dbs, N);
}
/* as the generic one, the R lane sums of a group of SM_VL rows taken together; at 512 bits with dd in
 * registers across the rows, with AVX2 (whose 16 registers hold the SM_VL sums) dd read from L1 */
static inline void sl_dtproj_ddt_f32(const float *CL_RESTRICT dd, int64_t R, const float *CL_RESTRICT wb,
                                     float *ddt) {
#if SM_VL == 16
    sm_vf vdd[SM_NV];
#pragma GCC unroll 16
    for (int k = 0; k < SM_NV; ++k) vdd[k] = sm_vload(dd + k * SM_VL);
#define SM_DDV(k) vdd[k]
#else
#define SM_DDV(k) sm_vload(dd + (k) * SM_VL)
#endif
    for (int64_t r0 = 0; r0 < R; r0 += SM_VL) {
        const int m = R - r0 < SM_VL ? (int)(R - r0) : SM_VL;
        sm_vf acc[SM_VL];
        for (int i = 0; i < SM_VL; ++i) acc[i] = sm_vzero();
        for (int i = 0; i < m; ++i) {
            const float *CL_RESTRICT w = wb + (r0 + i) * EB;
            sm_vf a = sm_vmul(SM_DDV(0), sm_vload(w));
#pragma GCC unroll 16
            for (int k = 1; k < SM_NV; ++k) a = sm_vfma(SM_DDV(k), sm_vload(w + k * SM_VL), a);
            acc[i] = a;
        }
        sm_vadd_first(ddt + r0, sm_vhsum_all(acc), m);
    }
#undef SM_DDV
}
/* as the generic one, a pass over NV vectors of columns (from j0) with RW rows' RW NV accumulators in
 * registers across E: per channel RW broadcasts, NV loads of W^T and RW NV FMAs. AVX-512's 32 registers
 * hold 8 rows of up to 3 vectors (x_proj's whole output at Vim-Ti's 44 columns in one pass over W^T, which
 * at 73 KB does not stay in L1), AVX2's 16 hold 6 rows of 2 (12 accumulators, 2 columns of W^T and a
 * broadcast; measured against 4 rows on the Zen 4 as an AVX2 CPU: the mixer core's forward 1.06-1.1x at
 * the demo's shape, 1.08x at Vim-Ti's) */
#define SM_XPROJ_NAME_(RW, NV) sm_xproj_pass##RW##_##NV
#define SM_XPROJ_NAME(RW, NV) SM_XPROJ_NAME_(RW, NV) /* RW and NV expanded before the name is pasted */
#define SM_XPROJ_PASS(RW, NV)                                                                      \
    static inline void SM_XPROJ_NAME(RW, NV)(const float *CL_RESTRICT u, int64_t L, int64_t E,     \
                                                const float *CL_RESTRICT wt, int64_t J, int64_t JP, \
                                                int64_t j0, float *CL_RESTRICT out) {              \
        for (int64_t t0 = 0; t0 < L; t0 += RW) {                                                   \
            const int64_t nt = L - t0 < RW ? L - t0 : RW;                                          \
            const float *ur[RW]; /* rows past L repeat the last one: computed, not stored */       \
            _Pragma("GCC unroll 8") for (int r = 0; r < RW; ++r) ur[r] = u + (t0 + (r < nt ? r : nt - 1)) * E; \
            sm_vf acc[RW][NV];                                                                     \
            _Pragma("GCC unroll 8") for (int r = 0; r < RW; ++r)                                   \
                _Pragma("GCC unroll 4") for (int k = 0; k < NV; ++k) acc[r][k] = sm_vzero();       \
            for (int64_t e = 0; e < E; ++e) {                                                      \
                const float *w = wt + e * JP + j0;                                                 \
                sm_vf wv[NV];                                                                      \
                _Pragma("GCC unroll 4") for (int k = 0; k < NV; ++k) wv[k] = sm_vload(w + k * SM_VL); \
                _Pragma("GCC unroll 8") for (int r = 0; r < RW; ++r) {                             \
                    const sm_vf v = sm_vset1(ur[r][e]);                                            \
                    _Pragma("GCC unroll 4") for (int k = 0; k < NV; ++k) acc[r][k] = sm_vfma(v, wv[k], acc[r][k]); \
                }                                                                                  \
            }                                                                                      \
            _Pragma("GCC unroll 4") for (int k = 0; k < NV; ++k) {                                 \
                const int64_t j = j0 + k * SM_VL;                                                  \
                if (j >= J) break;                                                                 \
                const int m = J - j < SM_VL ? (int)(J - j) : SM_VL;                                \
                for (int64_t r = 0; r < nt; ++r) sm_vstore_n(out + (t0 + r) * J + j, acc[r][k], m); \
            }                                                                                      \
        }                                                                                          \
    }
#if SM_VL == 16
#define SM_XPROJ_ROWS 8
#define SM_XPROJ_VECS 3
#else
#define SM_XPROJ_ROWS 6
#define SM_XPROJ_VECS 2
#endif
SM_XPROJ_PASS(SM_XPROJ_ROWS, 1)
SM_XPROJ_PASS(SM_XPROJ_ROWS, 2)
#if SM_XPROJ_VECS == 3
SM_XPROJ_PASS(SM_XPROJ_ROWS, 3)
#endif
static inline void sl_xproj_rows_f32(const float *CL_RESTRICT u, int64_t L, int64_t E, const float *CL_RESTRICT wt,
                                     int64_t J, int64_t JP, float *CL_RESTRICT out) {
    for (int64_t j0 = 0; j0 < JP; j0 += SM_XPROJ_VECS * SM_VL) {
        const int64_t nv = (JP - j0) / SM_VL;
#if SM_XPROJ_VECS == 3
        if (nv >= 3) SM_XPROJ_NAME(SM_XPROJ_ROWS, 3)(u, L, E, wt, J, JP, j0, out);
        else
#endif
        if (nv >= 2) SM_XPROJ_NAME(SM_XPROJ_ROWS, 2)(u, L, E, wt, J, JP, j0, out);
        else SM_XPROJ_NAME(SM_XPROJ_ROWS, 1)(u, L, E, wt, J, JP, j0, out);
    }
}
/* as the generic one, the row in registers across the J products (SM_CV vectors a pass) */
static inline void sl_rowmat_add_f32(const float *g, int64_t J, const float *CL_RESTRICT wb, float *CL_RESTRICT row) {
    for (int c0 = 0; c0 < SM_NV; c0 += SM_CV) {
        sm_vf acc[SM_CV];
#pragma GCC unroll 16
        for (int k = 0; k < SM_CV; ++k) acc[k] = c0 + k < SM_NV ? sm_vload(row + (c0 + k) * SM_VL) : sm_vzero();
        sm_rowmat_acc(acc, c0, g, J, wb);
#pragma GCC unroll 16
        for (int k = 0; k < SM_CV; ++k)
            if (c0 + k < SM_NV) sm_vstore(row + (c0 + k) * SM_VL, acc[k]);
    }
}
/* as the generic one, SM_DW_ROWS rows by SM_DW_VECS vectors of dW in registers across the L steps (24
 * vectors at 512 bits, 9 with AVX2's 16 registers), so each step costs loads of dd and dt and FMAs only,
 * no load / store of dW */
#if SM_VL == 16
#define SM_DW_ROWS (24 / SM_NV)
#define SM_DW_VECS SM_NV
#else
#define SM_DW_ROWS 3
#define SM_DW_VECS 3
#endif
static inline void sl_dtproj_dw_f32(const float *CL_RESTRICT dd, const float *dt0, int64_t sdt, int64_t L,
                                    int64_t R, float *CL_RESTRICT dwb) {
    for (int64_t r0 = 0; r0 < R; r0 += SM_DW_ROWS)
        for (int c0 = 0; c0 < SM_NV; c0 += SM_DW_VECS) {
            const int m = R - r0 < SM_DW_ROWS ? (int)(R - r0) : SM_DW_ROWS;
            sm_vf acc[SM_DW_ROWS][SM_DW_VECS];
#pragma GCC unroll 16
            for (int i = 0; i < SM_DW_ROWS; ++i)
#pragma GCC unroll 16
                for (int k = 0; k < SM_DW_VECS; ++k) acc[i][k] = sm_vzero();
            for (int64_t s = 0; s < L; ++s) {
                const float *dtr = dt0 + s * sdt + r0;
                sm_vf vd[SM_DW_VECS];
#pragma GCC unroll 16
                for (int k = 0; k < SM_DW_VECS; ++k)
                    vd[k] = c0 + k < SM_NV ? sm_vload(dd + s * EB + (c0 + k) * SM_VL) : sm_vzero();
#pragma GCC unroll 16
                for (int i = 0; i < SM_DW_ROWS; ++i) {
                    const sm_vf v = sm_vset1(i < m ? dtr[i] : 0.0f); /* rows past R: zeros, not stored */
#pragma GCC unroll 16
                    for (int k = 0; k < SM_DW_VECS; ++k) acc[i][k] = sm_vfma(vd[k], v, acc[i][k]);
                }
            }
            for (int i = 0; i < m; ++i)
#pragma GCC unroll 16
                for (int k = 0; k < SM_DW_VECS; ++k) {
                    if (c0 + k >= SM_NV) break;
                    float *p = dwb + (r0 + i) * EB + (c0 + k) * SM_VL;
                    sm_vstore(p, sm_vadd(sm_vload(p), acc[i][k]));
                }
        }
}
#define SM_STATE_LOOP_BITS (SM_VL * 32) /* the explicit loops' vector width, for the libraries' reports */

#endif /* SHUFFLEMAMBA_SCAN_STEPS_X86_H */
