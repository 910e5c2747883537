// Internal: LAPACK/BLAS loaded on first use (dlopen of liblapacke), and the SVDs built on it: the thin
// exact SVD (dgesdd) used by the SVD merge methods, and a truncated SVD (exact or randomized) used by
// extract-lora. Every matrix here is row-major f64.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace taskvec::detail {

// ---- the loaded library ----

/// BLAS dgemm with the Fortran ABI (LAPACKE has no wrapper for it); the two trailing size_t are the
/// hidden lengths of the character arguments.
using DgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
                         const int*, const double*, const int*, const double*, double*, const int*, std::size_t,
                         std::size_t);
/// LAPACKE entry points (lapack_int is int: the LP64 interface Debian ships).
using DgesddFn = int (*)(int, char, int, int, double*, int, double*, double*, int, double*, int);
using DgeqrfFn = int (*)(int, int, int, double*, int, double*);
using DorgqrFn = int (*)(int, int, int, int, double*, int, const double*);

struct Lapack {
  DgesddFn gesdd = nullptr;
  DgeqrfFn geqrf = nullptr;   ///< nullptr when the library lacks it (the randomized SVD then refuses)
  DorgqrFn orgqr = nullptr;
  DgemmFn gemm = nullptr;     ///< nullptr when absent: plain loops then
};

/// LAPACKE, loaded on the first call (liblapacke.so.3, then liblapacke.so) and pinned to one thread
/// when it is OpenBLAS. Why not linked: OpenBLAS would start its spinning thread pool in every taskvec
/// command (docs/BENCHMARKS.md), and taskvec parallelises over tensors itself. Thread-safe. Throws
/// Error{kUnsupported} naming the library when it cannot be loaded or lacks LAPACKE_dgesdd.
const Lapack& lapack();

/// Row-major C (m x n) = op(A) op(B), op = transpose when the flag is set; A is m x k (k x m when
/// transposed) with row stride lda, B is k x n (n x k) with row stride ldb, C has row stride ldc.
/// dgemm when loaded, else loops. Dimensions must fit in int (callers check).
void gemm_rm(bool trans_a, bool trans_b, int m, int n, int k, const double* a, int lda, const double* b, int ldb,
             double* c, int ldc);

// ---- SVDs ----

/// Row-major thin SVD: a (m x n) = u (m x k) diag(s) vt (k x n), k = min(m, n), s descending.
/// `a` is destroyed. Memory: LAPACKE's row-major copy of a plus dgesdd's workspace (about
/// 4k^2 + 6k + max(m, n) doubles) besides the outputs. Throws Error{kInternal} when dgesdd fails.
void svd_thin(std::vector<double>& a, int m, int n, std::vector<double>& u, std::vector<double>& s,
              std::vector<double>& vt);

/// How truncated_svd computes.
enum class SvdMethod {
  kAuto,        ///< exact when min(m, n) <= kExactSvdMaxDim or rank + oversampling >= min(m, n) / 2
  kExact,       ///< dgesdd of the whole matrix
  kRandomized,  ///< Halko-Martinsson-Tropp (falls back to exact when rank + oversampling >= min(m, n))
};

/// kAuto's threshold: matrices with min(m, n) up to this many rows or columns get the exact SVD. At 512
/// a dgesdd of 512 x 11008 takes 2.4 s on one core, the randomized one at rank 64 0.5 s (measured,
/// docs/CLI.md); beyond, the exact SVD's O(m n min(m, n)) cost grows out of reach (4096 x 11008:
/// minutes), so small models keep the exact answer at a cost of seconds.
inline constexpr int kExactSvdMaxDim = 512;

struct SvdOptions {
  SvdMethod method = SvdMethod::kAuto;
  int oversampling = 10;       ///< p: extra columns of the test matrix
  int power_iterations = 2;    ///< q: subspace iterations, each re-orthonormalized (dgeqrf + dorgqr)
  std::uint64_t seed = 0x7a5c0ec5eedULL;  ///< of the Gaussian test matrix (same seed, same bits)
};

/// A rank-r factorization a ~= u diag(s) vt.
struct TruncatedSvd {
  int m = 0, n = 0, rank = 0;   ///< rank = columns of u = rows of vt = s.size()
  std::vector<double> u;        ///< m x rank, row-major, orthonormal columns
  std::vector<double> s;        ///< rank singular values, descending, >= 0
  std::vector<double> vt;       ///< rank x n, row-major, orthonormal rows
  /// Every singular value when the exact method ran (min(m, n) of them); empty for the randomized one.
  std::vector<double> all_s;
  bool randomized = false;      ///< which method ran
};

/// The leading `rank` (clamped to [0, min(m, n)]) singular triplets of the row-major m x n matrix `a`.
/// Exact: dgesdd, then truncation. Randomized (Halko, Martinsson, Tropp 2011, Alg. 4.4 + 5.1): l = rank +
/// p columns, Y = A Omega with Omega an n x l standard Gaussian matrix from a fixed-seed generator
/// (mt19937_64 + Box-Muller, so the bits do not depend on the C++ library), Q = qr(Y); q times
/// Q = qr(A qr(A^T Q)); then B = Q^T A (l x n), B = U~ S V^T exactly, U = Q U~, truncated to `rank`.
/// Memory besides `a`: O((m + n) l) doubles for randomized (Omega, Y, A^T Q, B, and LAPACKE's row-major
/// copies), the exact method's as svd_thin (it copies `a` first). `a` is not modified. Deterministic for
/// a given input, options and LAPACK. Throws Error{kInvalidArgument} for m or n above INT_MAX or a
/// negative rank, Error{kInternal} when LAPACK fails, Error{kUnsupported} as lapack().
TruncatedSvd truncated_svd(const std::vector<double>& a, std::int64_t m, std::int64_t n, int rank,
                           const SvdOptions& options = {});

}  // namespace taskvec::detail
