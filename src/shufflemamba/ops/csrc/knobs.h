/*
 * Build knobs of the CPU kernels, all in one place. Each can be overridden with -D for an A/B
 * (benchmarks/profile_train_step.py --kernels-flags="-DCL_PF=3"); the defaults are the measured best.
 *
 *   EB             channels a block (default 96): the width of every channel loop; more independent
 *                  vector chains per state than 64, and it divides every Vim's E (2 D, D a multiple of 48).
 *   CL_PF          steps ahead that the channel-last kernels prefetch their rows (default 2): a step's
 *                  rows lie 1.5-3 KB apart, which the hardware stride prefetchers lose at 4 KB pages.
 *   CL_VPF         steps ahead that the conv backward's explicit x86 pass prefetches (default 4).
 *   CL_HIST_BYTES  bytes of state history the scan backward keeps per group of states (default 768 KB,
 *                  at most 3/4 of the L2 cache read at run time): the history must stay in L2 at long L.
 *
 * Included by mixer_cl.c (through scan_steps.h) and benchmarks/csrc/cpu_peak.c (which sets EB first).
 */
#ifndef SHUFFLEMAMBA_KNOBS_H
#define SHUFFLEMAMBA_KNOBS_H

/* Measured on the 2-core Intel Xeon, scan forward + backward interleaved in one process, 64 -> 96:
 * (64, 384, 65, 16) 44.6 -> 34.3 ms, (128, 192, 17, 8) 7.9 -> 7.5 ms, (32, 384, 197, 16) 84.4 -> 79.3 ms
 * (a scratch script; the training-step A/B is docs/benchmarks.md's, from
 * benchmarks/profile_train_step.py --kernels-from). At 96: 6 vectors of 16 floats, 12 of 8. */
#ifndef EB
#define EB 96
#endif
/* rows of EB floats are then whole 64-byte cache lines (sm_aligned_malloc), and every vector width
 * (4, 8, 16 floats) divides them */
#if EB <= 0 || EB % 16 != 0
#error "EB must be a positive multiple of 16"
#endif

/* Measured on the Intel Xeon (2 threads, scan forward of both directions at the D 192 shape, 64 x 65
 * x 384, N 16): 23.0 -> 19.7 ms with the forward's rows prefetched one or two steps ahead (a scratch A/B). */
#ifndef CL_PF
#define CL_PF 2
#endif

/* 2, 8 and 12 were no better (conv backward alone, Intel Xeon) */
#ifndef CL_VPF
#define CL_VPF 4
#endif

/* CL_HIST_BYTES has no default here: undefined, mixer_cl.c's sm_hist_bytes() reads the L2 size at
 * run time (its comment has the measurements). */

#endif /* SHUFFLEMAMBA_KNOBS_H */
