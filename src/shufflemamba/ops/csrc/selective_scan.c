/*
 * Selective scan (Mamba S6 recurrence) on the CPU: forward and hand-written backward.
 *
 * Plain C99 + OpenMP, no torch headers, so it compiles in about a second at first use
 * (see cpu_scan.py). One kernel body is stamped out for float and double by a macro.
 *
 * Layouts (all contiguous, row-major):
 *   u, delta, z, out, gout, du, ddelta, dz : (batch, E, L)
 *   A                                      : (E, N)
 *   Bt, Ct                                 : (batch, L, N)   -- B, C transposed so that N is
 *                                            innermost and the n-loops vectorise (libmvec exp)
 *   D, dbias                               : (E,)  or NULL
 *   dA_part                                : (batch, E, N)   per-batch partial sums of dA
 *   dD_part                                : (batch, E)      per-batch partial sums of dD (or NULL)
 *   dB_part, dC_part                       : (nchunk, batch, L, N) partial sums over E-chunks
 *
 * Recurrence (per batch b, channel e, state n):
 *   d_t   = softplus(delta_t + dbias)       (bias and softplus optional)
 *   a_t   = exp(d_t * A[n]);  h_t = a_t * h_{t-1} + d_t * u_t * B_t[n]
 *   y_t   = sum_n C_t[n] h_t[n] + D * u_t;  out_t = y_t * silu(z_t)
 * Backward, with g_t = dL/dh_t:
 *   g_t   = gy_t * C_t[n] + a_{t+1} * g_{t+1}
 *   dA[n] += g_t h_{t-1} a_t d_t,  dd_t = sum_n g_t (h_{t-1} a_t A[n] + u_t B_t[n])
 *   du_t  = d_t sum_n g_t B_t[n] + gy_t D,  dB_t[n] += g_t d_t u_t,  dC_t[n] += gy_t h_t[n]
 * The backward recomputes h and a for one (b, e) row into a thread-local (L+1) x N buffer, so
 * nothing of size (batch, E, L, N) is ever stored.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"

#define SS_RESTRICT __restrict__

/* Per-time-step scalar transcendentals (softplus, sigmoid) would cost more than the whole N-loop
 * if done inside the sequential t-loop, so every kernel runs them in separate passes over t that
 * the compiler vectorises (libmvec), and keeps the sequential loop to FMAs plus one exp per state.
 * Softplus uses torch's threshold (see common.h) so results match F.softplus. */
#define SS_DEFINE(T, SFX, EXP, LOG1P)                                                              \
    int ss_fwd_##SFX(const T *SS_RESTRICT u, const T *SS_RESTRICT delta, const T *SS_RESTRICT A,   \
                     const T *SS_RESTRICT Bt, const T *SS_RESTRICT Ct, const T *SS_RESTRICT D,     \
                     const T *SS_RESTRICT z, const T *SS_RESTRICT dbias, T *SS_RESTRICT out,       \
                     int64_t batch, int64_t E, int64_t L, int64_t N, int softplus, int nthreads) { \
        int failed = 0;                                                                            \
        _Pragma("omp parallel num_threads(nthreads) if (nthreads > 1)")                            \
        {                                                                                          \
            SM_FTZ_BEGIN                                                                           \
            /* h: N state; dts, dus: L-long rows of softplus(delta) and delta * u */               \
            T *buf = (T *)sm_aligned_malloc(sizeof(T) * (size_t)(N + 2 * L + 2));                  \
            if (!buf) {                                                                            \
                _Pragma("omp atomic write") failed = 1;                                            \
            }                                                                                      \
            T *SS_RESTRICT h = buf, *SS_RESTRICT dts = buf + N, *SS_RESTRICT dus = buf + N + L + 1; \
            _Pragma("omp for schedule(static)")                                                    \
            for (int64_t be = 0; be < batch * E; ++be) {                                           \
                if (!buf) continue;                                                                \
                const int64_t b = be / E, e = be % E;                                              \
                const T *SS_RESTRICT ur = u + be * L, *SS_RESTRICT dr = delta + be * L;            \
                const T *Bb = Bt + b * L * N, *Cb = Ct + b * L * N, *SS_RESTRICT Ae = A + e * N;   \
                const T De = D ? D[e] : (T)0, bias = dbias ? dbias[e] : (T)0;                      \
                T *SS_RESTRICT yr = out + be * L;                                                  \
                if (softplus) {                                                                    \
                    for (int64_t t = 0; t < L; ++t) {                                              \
                        const T x = dr[t] + bias;                                                  \
                        dts[t] = SM_SOFTPLUS(T, EXP, LOG1P, x);                                    \
                    }                                                                              \
                } else {                                                                           \
                    for (int64_t t = 0; t < L; ++t) dts[t] = dr[t] + bias;                         \
                }                                                                                  \
                for (int64_t t = 0; t < L; ++t) dus[t] = dts[t] * ur[t];                           \
                for (int64_t n = 0; n < N; ++n) h[n] = (T)0;                                       \
                for (int64_t t = 0; t < L; ++t) {                                                  \
                    const T d = dts[t], du = dus[t];                                               \
                    const T *SS_RESTRICT Bn = Bb + t * N, *SS_RESTRICT Cn = Cb + t * N;            \
                    T y = (T)0;                                                                    \
                    for (int64_t n = 0; n < N; ++n) {                                              \
                        h[n] = EXP(d * Ae[n]) * h[n] + du * Bn[n];                                 \
                        y += Cn[n] * h[n];                                                         \
                    }                                                                              \
                    yr[t] = y;                                                                     \
                }                                                                                  \
                if (z) {                                                                           \
                    const T *SS_RESTRICT zr = z + be * L;                                          \
                    for (int64_t t = 0; t < L; ++t)                                                \
                        yr[t] = (yr[t] + De * ur[t]) * zr[t] / ((T)1 + EXP(-zr[t]));               \
                } else {                                                                           \
                    for (int64_t t = 0; t < L; ++t) yr[t] += De * ur[t];                           \
                }                                                                                  \
            }                                                                                      \
            SM_FTZ_END                                                                             \
            free(buf);                                                                             \
        }                                                                                          \
        return failed;                                                                             \
    }                                                                                              \
                                                                                                   \
    int ss_bwd_##SFX(const T *SS_RESTRICT u, const T *SS_RESTRICT delta, const T *SS_RESTRICT A,   \
                     const T *SS_RESTRICT Bt, const T *SS_RESTRICT Ct, const T *SS_RESTRICT D,     \
                     const T *SS_RESTRICT z, const T *SS_RESTRICT dbias,                           \
                     const T *SS_RESTRICT gout, T *SS_RESTRICT du, T *SS_RESTRICT ddelta,          \
                     T *SS_RESTRICT dA_part, T *SS_RESTRICT dB_part, T *SS_RESTRICT dC_part,       \
                     T *SS_RESTRICT dD_part, T *SS_RESTRICT dz, int64_t batch, int64_t E,          \
                     int64_t L, int64_t N, int softplus, int64_t nchunk, int nthreads) {           \
        int failed = 0;                                                                            \
        const int64_t chunk = (E + nchunk - 1) / nchunk;                                           \
        _Pragma("omp parallel num_threads(nthreads) if (nthreads > 1)")                            \
        {                                                                                          \
            SM_FTZ_BEGIN                                                                           \
            /* hbuf rows 0..L hold h_{t-1} (row 0 = h_{-1} = 0); abuf rows 0..L-1 hold a_t and   */ \
            /* row L is zero, so a_{t+1} at the last step needs no special case. Then N-long g   */ \
            /* and dA accumulators, and L-long rows: d_t, sigmoid(delta_t), gy_t, y_t.           */ \
            const size_t rows = (size_t)(L + 1) * (size_t)N;                                       \
            T *buf = (T *)sm_aligned_malloc(sizeof(T) * (2 * rows + 2 * (size_t)N                   \
                                                         + 4 * (size_t)(L + 1)));                     \
            if (!buf) {                                                                            \
                _Pragma("omp atomic write") failed = 1;                                            \
            }                                                                                      \
            T *SS_RESTRICT hbuf = buf, *SS_RESTRICT abuf = buf + rows;                             \
            T *SS_RESTRICT g = abuf + rows, *SS_RESTRICT dAe = g + N;                              \
            T *SS_RESTRICT dts = dAe + N, *SS_RESTRICT sgs = dts + L + 1;                          \
            T *SS_RESTRICT gys = sgs + L + 1, *SS_RESTRICT ys = gys + L + 1;                       \
            _Pragma("omp for schedule(static)")                                                    \
            for (int64_t item = 0; item < nchunk * batch; ++item) {                                \
                if (!buf) continue;                                                                \
                const int64_t c = item / batch, b = item % batch;                                  \
                const int64_t e0 = c * chunk, e1 = e0 + chunk < E ? e0 + chunk : E;                \
                /* this item owns dB/dC partial row (c, b): zero it, then sum over its channels */ \
                T *dBb = dB_part + (c * batch + b) * L * N, *dCb = dC_part + (c * batch + b) * L * N; \
                memset(dBb, 0, sizeof(T) * (size_t)(L * N));                                       \
                memset(dCb, 0, sizeof(T) * (size_t)(L * N));                                       \
                const T *Bb = Bt + b * L * N, *Cb = Ct + b * L * N;                                \
                for (int64_t e = e0; e < e1; ++e) {                                                \
                    const int64_t be = b * E + e;                                                  \
                    const T *SS_RESTRICT ur = u + be * L, *SS_RESTRICT dr = delta + be * L;        \
                    const T *SS_RESTRICT gr = gout + be * L, *SS_RESTRICT Ae = A + e * N;          \
                    const T De = D ? D[e] : (T)0, bias = dbias ? dbias[e] : (T)0;                  \
                    T *SS_RESTRICT dur = du + be * L, *SS_RESTRICT ddr = ddelta + be * L;          \
                    /* pass 0 (vectorised over t): d_t, softplus' derivative, gy_t */              \
                    if (softplus) {                                                                \
                        for (int64_t t = 0; t < L; ++t) {                                          \
                            const T x = dr[t] + bias;                                              \
                            dts[t] = SM_SOFTPLUS(T, EXP, LOG1P, x);                                \
                            sgs[t] = SM_SIGMOID(T, EXP, x);                                        \
                        }                                                                          \
                    } else {                                                                       \
                        for (int64_t t = 0; t < L; ++t) dts[t] = dr[t] + bias;                     \
                    }                                                                              \
                    if (z) {                                                                       \
                        const T *SS_RESTRICT zr = z + be * L;                                      \
                        for (int64_t t = 0; t < L; ++t) gys[t] = gr[t] * zr[t] / ((T)1 + EXP(-zr[t])); \
                    } else {                                                                       \
                        for (int64_t t = 0; t < L; ++t) gys[t] = gr[t];                            \
                    }                                                                              \
                    for (int64_t n = 0; n < N; ++n) {                                              \
                        hbuf[n] = (T)0;                                                            \
                        abuf[L * N + n] = (T)0;                                                    \
                        g[n] = (T)0;                                                               \
                        dAe[n] = (T)0;                                                             \
                    }                                                                              \
                    /* pass 1: recompute the forward; dC needs only h_t, so it goes here */        \
                    for (int64_t t = 0; t < L; ++t) {                                              \
                        const T d = dts[t], dut = d * ur[t], gy = gys[t];                          \
                        const T *SS_RESTRICT Bn = Bb + t * N, *SS_RESTRICT Cn = Cb + t * N;        \
                        const T *SS_RESTRICT hp = hbuf + t * N;                                    \
                        T *SS_RESTRICT hc = hbuf + (t + 1) * N, *SS_RESTRICT an = abuf + t * N;    \
                        T *SS_RESTRICT dCn = dCb + t * N;                                          \
                        T y = (T)0;                                                                \
                        for (int64_t n = 0; n < N; ++n) {                                          \
                            const T a = EXP(d * Ae[n]), hn = a * hp[n] + dut * Bn[n];              \
                            an[n] = a;                                                             \
                            hc[n] = hn;                                                            \
                            y += Cn[n] * hn;                                                       \
                            dCn[n] += gy * hn;                                                     \
                        }                                                                          \
                        ys[t] = y;                                                                 \
                    }                                                                              \
                    /* pass 1b (vectorised over t): dz and dD need y_t */                          \
                    T dDacc = (T)0;                                                                \
                    if (z) {                                                                       \
                        const T *SS_RESTRICT zr = z + be * L;                                      \
                        T *SS_RESTRICT dzr = dz + be * L;                                          \
                        for (int64_t t = 0; t < L; ++t) {                                          \
                            const T s = SM_SIGMOID(T, EXP, zr[t]);                                 \
                            dzr[t] = gr[t] * (ys[t] + De * ur[t]) * s * ((T)1 + zr[t] * ((T)1 - s)); \
                        }                                                                          \
                    }                                                                              \
                    for (int64_t t = 0; t < L; ++t) dDacc += gys[t] * ur[t];                       \
                    /* pass 2: reverse recurrence for g_t = dL/dh_t */                             \
                    for (int64_t t = L - 1; t >= 0; --t) {                                         \
                        const T d = dts[t], ut = ur[t], gy = gys[t], dut = d * ut;                 \
                        const T *SS_RESTRICT Bn = Bb + t * N, *SS_RESTRICT Cn = Cb + t * N;        \
                        const T *SS_RESTRICT hp = hbuf + t * N, *SS_RESTRICT an = abuf + t * N;    \
                        const T *SS_RESTRICT anext = abuf + (t + 1) * N;                           \
                        T *SS_RESTRICT dBn = dBb + t * N;                                          \
                        T dd = (T)0, sgB = (T)0;                                                   \
                        for (int64_t n = 0; n < N; ++n) {                                          \
                            const T gn = gy * Cn[n] + anext[n] * g[n];                             \
                            g[n] = gn;                                                             \
                            const T ga = gn * hp[n] * an[n];                                       \
                            dd += ga * Ae[n];                                                      \
                            dAe[n] += ga * d;                                                      \
                            sgB += gn * Bn[n];                                                     \
                            dBn[n] += gn * dut;                                                    \
                        }                                                                          \
                        dur[t] = d * sgB + gy * De;                                                \
                        ddr[t] = dd + ut * sgB;                                                    \
                    }                                                                              \
                    if (softplus)                                                                  \
                        for (int64_t t = 0; t < L; ++t) ddr[t] *= sgs[t];                          \
                    for (int64_t n = 0; n < N; ++n) dA_part[be * N + n] = dAe[n];                  \
                    if (dD_part) dD_part[be] = dDacc;                                              \
                }                                                                                  \
            }                                                                                      \
            SM_FTZ_END                                                                             \
            free(buf);                                                                             \
        }                                                                                          \
        return failed;                                                                             \
    }

SS_DEFINE(float, f32, sm_expf, log1pf)
SS_DEFINE(double, f64, exp, log1p)

/* Lets the loader check that it opened the library it expects. */
int ss_abi_version(void) { return 16; }
