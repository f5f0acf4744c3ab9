/*
 * The state loops of one time step of the channel-last scans (mixer_cl.c), for one block of EB
 * channels: the part of the scan that runs once per (channel, state) and dominates its cost.
 *
 *   sl_fwd_states_SFX     forward:  h_n = 2^(d A_n) h_n + (d u) B_n;  y = sum_n C_n h_n
 *   sl_replay_states_SFX  backward, pass 1: the same recurrence from the saved h_{s-1}, storing the
 *                         decays a_n and the new states, and dC_n = sum over the block of gy h_n
 *   sl_adjoint_states_SFX backward, pass 2 (reverse time): g_n, dA_n, dB_n, and the block's sums
 *                         over the states that the step's d(delta) and du need
 * and the row functions of a step around them (softplus, the gate, dt_proj's and x_proj's products).
 *
 * A is pre-scaled by log2(e) (CL_LOAD_A_LOG2E), so the decay is 2^(d A).
 *
 * Two versions:
 *   scan_steps_generic.h  one body every ISA builds (double always, float where there is no
 *                         explicit path): plain `omp simd` loops with the inlined sm_exp2f;
 *   scan_steps_x86.h      float on x86 with a width flag (SM_VECTOR_BITS): explicit vectors, where they
 *                         measured faster (the file says how), over vec_x86.h's primitives of one of
 *                         AVX-512 (512 or 256 bits) or AVX2 + FMA (256 bits); its exps and other
 *                         pointwise functions in pointwise_x86.h, its conv rows in conv_steps_x86.h.
 * Included (after common.h and CL_RESTRICT) by mixer_cl.c and benchmarks/csrc/cpu_peak.c.
 */
#ifndef SHUFFLEMAMBA_SCAN_STEPS_H
#define SHUFFLEMAMBA_SCAN_STEPS_H

#include "knobs.h" /* EB */

/* the widest x_proj output (R + 2N, padded to 16) the fused forward takes; wider: the caller's own matmul */
#define SM_XPROJ_MAX 256

#define T double
#define SFX f64
#define EXP2 exp2
#define EXP exp
#define SOFTPLUS sm_softplus
#define EXPM1 expm1
#include "scan_steps_generic.h"
#undef T
#undef SFX
#undef EXP2
#undef EXP
#undef SOFTPLUS
#undef EXPM1

#if defined(SM_VECTOR_BITS) && defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define SM_VEC_AVX512 1
#include "scan_steps_x86.h" /* defines SM_SCAN_VECTOR_PATH and SM_STATE_LOOP_BITS */
#elif defined(SM_VECTOR_BITS) && SM_VECTOR_BITS == 256 && defined(__AVX2__) && defined(__FMA__)
#define SM_VEC_AVX2 1
#include "scan_steps_x86.h"
#else
#define T float
#define SFX f32
#define EXP2 sm_exp2f
#define EXP sm_expf
#define SOFTPLUS sm_softplusf
#define EXPM1 sm_expm1f
#include "scan_steps_generic.h"
#undef T
#undef SFX
#undef EXP2
#undef EXP
#undef SOFTPLUS
#undef EXPM1
#define SM_STATE_LOOP_BITS 0 /* no explicit loops */
#endif

#endif /* SHUFFLEMAMBA_SCAN_STEPS_H */
