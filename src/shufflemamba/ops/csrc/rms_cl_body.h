/*
 * RMSNorm with the residual add fused (the Vim block's norm), forward and backward, for one element
 * type: included once per type by mixer_cl.c (T, SFX, SQRT defined before; CL_FN(name) is name_SFX).
 * No include guard, on purpose.
 */
/* RMSNorm of rows of width D (the Vim block's norm): y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps),
 * with the block's residual add fused in: given res, x + res is written to xsum and normalised (one
 * pass instead of an add's pass and the norm's).
 * The backward: gx = rstd * gy * w - x * rstd^3 * mean(gy * w * x) (+ gadd, the gradient that reached
 * xsum from elsewhere: autograd's own add of the two, fused); gw = sum over rows of gy * x * rstd,
 * accumulated per chunk of rows so that threads never share a row, the chunks then summed in order. */
int CL_FN(rms_fwd)(const T *CL_RESTRICT x, const T *CL_RESTRICT res, T *CL_RESTRICT xsum,
                  const T *CL_RESTRICT w, T *CL_RESTRICT y, T *CL_RESTRICT rstd, int64_t rows,
                  int64_t D, double eps, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) if (nthreads > 1) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const T *xr = x + r * D; /* then xsum's row, with res */
        T *CL_RESTRICT yr = y + r * D;
        T ss = (T)0;
        if (res) {
            const T *CL_RESTRICT rr = res + r * D;
            T *CL_RESTRICT sr = xsum + r * D;
            #pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < D; ++i) {
                const T v = xr[i] + rr[i];
                sr[i] = v;
                ss += v * v;
            }
            xr = sr;
        } else {
            #pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
        }
        const T rs = (T)1 / SQRT(ss / (T)D + (T)eps);
        if (rstd) rstd[r] = rs;
        #pragma omp simd
        for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * rs * w[i];
    }
    return 0;
}

int CL_FN(rms_bwd)(const T *CL_RESTRICT x, const T *CL_RESTRICT w, const T *CL_RESTRICT rstd,
                  const T *CL_RESTRICT gy, const T *CL_RESTRICT gadd, T *CL_RESTRICT gx,
                  T *CL_RESTRICT gw_out, int64_t rows, int64_t D, int64_t nchunk, int nthreads) {
    T *parts = (T *)calloc((size_t)nchunk * (size_t)D, sizeof(T));
    if (!parts) return 1;
    #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        #pragma omp for schedule(static)
        for (int64_t c = 0; c < nchunk; ++c) {
            T *CL_RESTRICT gw = parts + c * D;
            const int64_t r0 = rows * c / nchunk, r1 = rows * (c + 1) / nchunk;
            for (int64_t r = r0; r < r1; ++r) {
                const T *CL_RESTRICT xr = x + r * D, *CL_RESTRICT gr = gy + r * D;
                T *CL_RESTRICT gxr = gx + r * D;
                const T rs = rstd[r];
                T dot = (T)0;
                #pragma omp simd reduction(+ : dot)
                for (int64_t i = 0; i < D; ++i) {
                    dot += gr[i] * w[i] * xr[i];
                    gw[i] += gr[i] * xr[i] * rs;
                }
                const T k = rs * rs * rs * dot / (T)D;
                if (gadd) {
                    const T *CL_RESTRICT ga = gadd + r * D;
                    #pragma omp simd
                    for (int64_t i = 0; i < D; ++i) gxr[i] = rs * gr[i] * w[i] - k * xr[i] + ga[i];
                } else {
                    #pragma omp simd
                    for (int64_t i = 0; i < D; ++i) gxr[i] = rs * gr[i] * w[i] - k * xr[i];
                }
            }
        }
        CL_REDUCE_PARTS(T, gw_out, parts, D, nchunk);
    }
    free(parts);
    return 0;
}
