// Internal: TASKVEC_SIMD_CLONES marks a hot loop to be compiled twice, for the x86-64 baseline and for
// AVX2, the copy picked when the program loads (GCC target_clones + an ifunc resolver).
//
// AVX2 has no FMA instruction, so no clone can fuse a * b + c (GCC contracts by default in C++): every
// clone rounds as the baseline does and taskvec's output bytes do not depend on the CPU. Never add an
// FMA-capable target (fma, x86-64-v3, avx512f) here. Not under TSan: the ifunc resolver would run
// before the TSan runtime is up. Elsewhere (clang, other CPUs) the macro is empty.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && !defined(__SANITIZE_THREAD__)
#define TASKVEC_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TASKVEC_SIMD_CLONES
#endif
