/*
 * Channel-last CPU kernels for the Vim mixer: depthwise causal conv1d + SiLU, and the selective
 * scan, both with a `reverse` flag so the backward direction of bimamba runs without any flip.
 *
 * Layouts: the sequence tensors are (batch, L, E) with E innermost (unit stride) -- that is how
 * in_proj / x_proj / dt_proj produce them, so the mixer hands over strided views and nothing is
 * transposed or copied. Strided inputs pass (batch stride, time stride) in elements.
 *   x (conv input), z             : (batch, L, E) strided
 *   u, delta, gout                : (batch, L, E) contiguous
 *   ysave / ysv                   : (batch, L, E) y + D u before the gate (only with z), optional:
 *                                   given, the forward writes it and the backward's replay needs no
 *                                   C_t h_t sum; NULL (the mixer's default), the replay sums it again,
 *                                   cheaper than writing and reading the tensor (docs/benchmarks.md)
 *   dsave / dsv                   : (batch, L, E) the step d = softplus(delta + bias), written by
 *                                   the forward and read by the backward instead of delta
 *   Bm, Cm                        : (batch, L, N) strided (slices of x_proj's output)
 *   A, conv weight, dt_proj weight: (E, N), (E, K), (E, R) as the modules hold them; each kernel
 *                                   works from a copy transposed channels-innermost (At, wt, dtw),
 *                                   so the channel loops vectorise, and writes their gradients back
 *                                   in these layouts
 * reverse = 1 processes time from L-1 down to 0: the result equals flip(op(flip(input))), so
 * the conv becomes anti-causal and the scan runs backwards, both in original time order.
 *
 * The scan vectorises over channels (blocks of EB), with the state loop outside: B_t[n] and
 * C_t[n] are scalars broadcast over the block, and y needs no horizontal sum. Padded lanes of a
 * partial block carry zeros (u = 0 -> h stays 0, gradients 0), so every inner loop has the
 * compile-time trip count EB.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h> /* sysconf: the L2 size */

#ifdef _OPENMP
#include <omp.h>
#define CL_THREAD_NUM() ((int64_t)omp_get_thread_num())
#else
#define CL_THREAD_NUM() ((int64_t)0)
#endif

#include "common.h"

/* GCC turns the kernels' row copies (CL_LOAD / CL_STORE below, EB floats) into memcpy calls where its own
 * expansion of a 384-byte copy takes more moves than it inlines (AVX2's 32-byte ones): perf had
 * memmove at ~5% of an AVX2 build's training step that the AVX-512 build does not spend. Kept as loops */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-loop-distribute-patterns")
#endif

#define CL_RESTRICT __restrict__
#include "knobs.h" /* EB, CL_PF, CL_HIST_BYTES: the build knobs, documented there */
/* every channel loop carries "omp simd": without it gcc leaves several of them scalar
 * ("no vectype" after folding the row copies), which measured 2-3x slower */
#include "scan_steps.h" /* the per-state loops of one time step (explicit x86 vectors where available) */

/* copy ne (<= EB) values into an EB-long local row, zero the rest; full rows (the common case)
 * take an inlined fixed-length copy: a memcpy call per row and step measured as a visible cost */
#define CL_LOAD(T, dst, src, ne)                                                                   \
    do {                                                                                           \
        if ((ne) == EB) {                                                                          \
            _Pragma("omp simd") for (int j_ = 0; j_ < EB; ++j_)(dst)[j_] = (src)[j_];              \
        } else {                                                                                   \
            memcpy((dst), (src), sizeof(T) * (size_t)(ne));                                        \
            memset((dst) + (ne), 0, sizeof(T) * (size_t)(EB - (ne)));                             \
        }                                                                                          \
    } while (0)
/* store the first ne values of an EB-long local row */
#define CL_STORE(T, dst, src, ne)                                                                  \
    do {                                                                                           \
        if ((ne) == EB) {                                                                          \
            _Pragma("omp simd") for (int j_ = 0; j_ < EB; ++j_)(dst)[j_] = (src)[j_];              \
        } else {                                                                                   \
            memcpy((dst), (src), sizeof(T) * (size_t)(ne));                                        \
        }                                                                                          \
    } while (0)

/* store the first ne values of an EB-long local row, after adding the destination's to them with acc
 * (the mixer's second direction adds its output and its dz to the first one's) */
#define CL_STORE_ACC(T, dst, src, ne, acc)                                                         \
    do {                                                                                           \
        T *CL_RESTRICT d_ = (dst);                                                                 \
        if ((acc) && (ne) == EB) {                                                                 \
            _Pragma("omp simd") for (int j_ = 0; j_ < EB; ++j_)(src)[j_] += d_[j_];                \
        } else if (acc) {                                                                          \
            for (int64_t j_ = 0; j_ < (ne); ++j_)(src)[j_] += d_[j_];                              \
        }                                                                                          \
        CL_STORE(T, d_, src, ne);                                                                  \
    } while (0)

/* Software prefetch of the rows that step s + CL_PF (s - CL_PF in the backward's reverse pass)
 * reads or writes. One step's rows lie 1.5-3 KB apart in (batch, L, E) tensors and in views of
 * in_proj / x_proj outputs, so the hardware's stride prefetchers, which stop at 4 KB page
 * boundaries, keep losing them: each step then waited on its rows
 * (knobs.h: CL_PF, the measurement) */
#define CL_PREFETCH(p, n, rw)                                                                      \
    do {                                                                                           \
        for (int64_t q_ = 0; q_ < (n); q_ += 64 / (int64_t)sizeof(*(p))) __builtin_prefetch((p) + q_, rw, 3); \
    } while (0)
#define CL_PREFETCH_ROW(p, rw) CL_PREFETCH(p, EB, rw)

/* States per group of the scan backward (sl_bwd): its history (states and decays of every step,
 * 2 (L + 1) EB values a state) is kept near sm_hist_bytes() by running the recurrences over groups of
 * states, one after the other. With all N at once the history outgrew the L2
 * cache at long L: at Vim-Ti's (L 197, N 16) 2.4 MB a block, and the backward's time per
 * element-step grew with L (377 ps at L 33, 548 ps at L 197; Intel Xeon, 2 MB L2 a core). 768 KB was
 * the best there of 1/8, 1/4, 3/8, 1/2 and 3/4 of the L2 (scan backward at Vim-Ti's shape 1.08x over
 * 512 KB and 1.04x over 1 MB), and the best on the AMD EPYC Zen 4 (1 MB L2) too, where it is 3/4 of the
 * L2: Vim-Ti's mixer core backward 1.06x over 384 KB (3/8 of it), 1.07x at 1.5 MB, 1.04x at all 16 states
 * (benchmarks/profile_train_step.py --kernels-flags=-DCL_HIST_BYTES=.. --core --models tiny224, one
 * thread). So 768 KB, at most 3/4 of a smaller L2; 768 KB where the size is unknown. Groups of equal
 * size: ceil(N / ngroups) */
static int64_t sm_hist_bytes(void) {
#ifdef CL_HIST_BYTES
    return CL_HIST_BYTES;
#else
    static int64_t bytes = 0; /* a benign race: every thread computes the same value */
    if (bytes == 0) {
        long l2 = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
        l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
        bytes = l2 >= 256 * 1024 && l2 * 3 / 4 < 768 * 1024 ? (int64_t)l2 * 3 / 4 : 768 * 1024;
    }
    return bytes;
#endif
}
static inline int64_t sm_state_group(int64_t N, int64_t L, int64_t elem_bytes) {
    const int64_t per_state = 2 * (L + 1) * EB * elem_bytes;
    int64_t g = sm_hist_bytes() / per_state;
    if (g >= N) return N;
    if (g < 1) g = 1;
    const int64_t ngroups = (N + g - 1) / g;
    return (N + ngroups - 1) / ngroups;
}

/* dst[0..ne) += src[0..ne) */
#define CL_ADD_ROW(dst, src, ne)                                                                   \
    do {                                                                                           \
        _Pragma("omp simd") for (int64_t j_ = 0; j_ < (ne); ++j_)(dst)[j_] += (src)[j_];           \
    } while (0)

/* out[j] = sum over the threads' rows of parts (nthreads x P), in thread order, so the sums are
 * bit-identical for a given thread count; run by the whole team after the loop that filled parts
 * (whose omp for ends in a barrier), each thread taking a share of the P columns. The kernels used to
 * hand their per-thread rows to the caller, whose torch.sum per gradient (and zeroed buffer) cost
 * ~10 us each, 14 per mixer layer and step (Intel Xeon, the demo's size: a visible share there). */
#define CL_REDUCE_PARTS(T, out, parts, P, nth)                                                     \
    do {                                                                                           \
        _Pragma("omp for schedule(static)") for (int64_t j_ = 0; j_ < (P); ++j_) {                 \
            T s_ = (parts)[j_];                                                                    \
            for (int64_t t_ = 1; t_ < (nth); ++t_) s_ += (parts)[t_ * (P) + j_];                   \
            (out)[j_] = s_;                                                                        \
        }                                                                                          \
    } while (0)

/* the N rows of A (N x E, transposed) for channels e0.. of a block, times log2(e): the scans' decays
 * are 2^(d A log2 e) (one multiply fewer per element than exp(d A)); the backward scales its sum
 * over A back by ln 2 */
#define CL_LOAD_A_LOG2E(T, Ab, At, N, E, e0, ne)                                                   \
    do {                                                                                           \
        for (int64_t n_ = 0; n_ < (N); ++n_) CL_LOAD(T, (Ab) + n_ * EB, (At) + n_ * (E) + (e0), ne); \
        _Pragma("omp simd") for (int64_t j_ = 0; j_ < (N) * EB; ++j_)(Ab)[j_] *= (T)SM_LOG2E_D;   \
    } while (0)

/* The kernels: three bodies per element type, T and SFX defined before each #include; CL_FN(name) names
 * their functions name_f32 / name_f64 (common.h). The elementwise math of each type (exp, softplus,
 * sigmoid) lives in scan_steps.h's row functions.
 *   conv_cl_body.h   the depthwise conv + SiLU (cv_fwd, cv_bwd) and the forward's chunked conv + x_proj
 *   mixer_cl_body.h  the selective scans (sl_fwd, sl_bwd), which fuse the conv rows in the mixer
 *   rms_cl_body.h    RMSNorm with the residual add (rms_fwd, rms_bwd) */
#define T float
#define SFX f32
#define SQRT sqrtf
#include "conv_cl_body.h"
#include "mixer_cl_body.h"
#include "rms_cl_body.h"
#undef T
#undef SFX
#undef SQRT

#define T double
#define SFX f64
#define SQRT sqrt
#include "conv_cl_body.h"
#include "mixer_cl_body.h"
#include "rms_cl_body.h"
#undef T
#undef SFX
#undef SQRT

/* the vector width in bits of the explicit-vector state loops (scan_steps.h), 0 where the generic
 * omp simd loops run (double always; float without AVX-512 or without SM_VECTOR_BITS) */
int sl_vector_path(void) { return SM_STATE_LOOP_BITS; }
