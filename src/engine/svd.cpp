// LAPACK loaded on first use, the exact thin SVD and the truncated (exact or randomized) SVD.
#include "engine/svd.hpp"

#include <dlfcn.h>
#include <lapacke.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <numbers>
#include <random>
#include <string>

#include "taskvec/error.hpp"

namespace taskvec::detail {

static_assert(sizeof(lapack_int) == sizeof(int), "taskvec expects the LP64 LAPACKE interface");

const Lapack& lapack() {
  static const Lapack loaded = [] {
    std::string errors;
    void* handle = nullptr;
    for (const char* name : {"liblapacke.so.3", "liblapacke.so"}) {
      handle = ::dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (handle != nullptr) break;
      if (const char* e = ::dlerror()) errors += std::string(errors.empty() ? "" : "; ") + e;
    }
    Lapack l;
    if (handle != nullptr) {
      l.gesdd = reinterpret_cast<DgesddFn>(::dlsym(handle, "LAPACKE_dgesdd"));
      l.geqrf = reinterpret_cast<DgeqrfFn>(::dlsym(handle, "LAPACKE_dgeqrf"));
      l.orgqr = reinterpret_cast<DorgqrFn>(::dlsym(handle, "LAPACKE_dorgqr"));
      l.gemm = reinterpret_cast<DgemmFn>(::dlsym(handle, "dgemm_"));
    }
    if (l.gesdd == nullptr) {
      throw Error(ErrorCode::kUnsupported, "the SVD (merge methods tsv_merge and iso_c, extract-lora) needs LAPACKE "
                                           "(Debian: liblapacke), which could not be loaded: " +
                                               (errors.empty() ? std::string("no LAPACKE_dgesdd") : errors));
    }
    using SetThreads = void (*)(int);
    if (auto* f = reinterpret_cast<SetThreads>(::dlsym(handle, "openblas_set_num_threads"))) f(1);
    return l;
  }();
  return loaded;
}

void gemm_rm(bool trans_a, bool trans_b, int m, int n, int k, const double* a, int lda, const double* b, int ldb,
             double* c, int ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int i = 0; i < m; ++i) std::fill_n(c + static_cast<std::size_t>(i) * ldc, n, 0.0);
    return;
  }
  if (const DgemmFn gemm = lapack().gemm) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, and a row-major matrix read
    // column-major is its transpose: so pass B first, with the same transpose flags.
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const double one = 1.0, zero = 0.0;
    gemm(&tb, &ta, &n, &m, &k, &one, b, &ldb, a, &lda, &zero, c, &ldc, 1, 1);
    return;
  }
  const auto at = [&](int i, int p) { return trans_a ? a[static_cast<std::size_t>(p) * lda + i] : a[static_cast<std::size_t>(i) * lda + p]; };
  const auto bt = [&](int p, int j) { return trans_b ? b[static_cast<std::size_t>(j) * ldb + p] : b[static_cast<std::size_t>(p) * ldb + j]; };
  for (int i = 0; i < m; ++i) {
    double* row = c + static_cast<std::size_t>(i) * ldc;
    std::fill_n(row, n, 0.0);
    for (int p = 0; p < k; ++p) {
      const double f = at(i, p);
      for (int j = 0; j < n; ++j) row[j] += f * bt(p, j);
    }
  }
}

void svd_thin(std::vector<double>& a, int m, int n, std::vector<double>& u, std::vector<double>& s,
              std::vector<double>& vt) {
  const Lapack& lib = lapack();
  const int r = std::min(m, n);
  u.assign(static_cast<std::size_t>(m) * r, 0.0);
  s.assign(r, 0.0);
  vt.assign(static_cast<std::size_t>(r) * n, 0.0);
  if (r == 0) return;
  const int info = lib.gesdd(LAPACK_ROW_MAJOR, 'S', m, n, a.data(), n, s.data(), u.data(), r, vt.data(), n);
  if (info != 0) throw Error(ErrorCode::kInternal, "LAPACKE_dgesdd failed (info " + std::to_string(info) + ")");
}

namespace {

// Replaces the row-major m x l matrix y (m >= l) by an orthonormal basis of its columns (thin Q of QR).
void orthonormalize(std::vector<double>& y, int m, int l, std::vector<double>& tau) {
  const Lapack& lib = lapack();
  tau.assign(static_cast<std::size_t>(l), 0.0);
  int info = lib.geqrf(LAPACK_ROW_MAJOR, m, l, y.data(), l, tau.data());
  if (info != 0) throw Error(ErrorCode::kInternal, "LAPACKE_dgeqrf failed (info " + std::to_string(info) + ")");
  info = lib.orgqr(LAPACK_ROW_MAJOR, m, l, l, y.data(), l, tau.data());
  if (info != 0) throw Error(ErrorCode::kInternal, "LAPACKE_dorgqr failed (info " + std::to_string(info) + ")");
}

// Standard normal values from mt19937_64 by Box-Muller (the same bits with any C++ library, unlike
// std::normal_distribution).
void fill_gaussian(std::vector<double>& out, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  const auto uniform = [&gen] {  // (0, 1]: 53 random bits
    return (static_cast<double>(gen() >> 11) + 1.0) * 0x1.0p-53;
  };
  for (std::size_t i = 0; i < out.size(); i += 2) {
    const double r = std::sqrt(-2.0 * std::log(uniform()));
    const double t = 2.0 * std::numbers::pi * uniform();
    out[i] = r * std::cos(t);
    if (i + 1 < out.size()) out[i + 1] = r * std::sin(t);
  }
}

TruncatedSvd exact(const std::vector<double>& a, int m, int n, int rank) {
  TruncatedSvd out;
  out.m = m;
  out.n = n;
  out.rank = rank;
  std::vector<double> copy(a), u, s, vt;
  svd_thin(copy, m, n, u, s, vt);
  const int k = std::min(m, n);
  out.u.resize(static_cast<std::size_t>(m) * rank);
  for (int i = 0; i < m; ++i)
    std::copy_n(&u[static_cast<std::size_t>(i) * k], rank, &out.u[static_cast<std::size_t>(i) * rank]);
  out.s.assign(s.begin(), s.begin() + rank);
  out.vt.assign(vt.begin(), vt.begin() + static_cast<std::ptrdiff_t>(rank) * n);
  out.all_s = std::move(s);
  return out;
}

TruncatedSvd randomized(const std::vector<double>& a, int m, int n, int rank, int l, const SvdOptions& options) {
  const Lapack& lib = lapack();
  if (lib.geqrf == nullptr || lib.orgqr == nullptr) {
    throw Error(ErrorCode::kUnsupported, "the randomized SVD needs LAPACKE_dgeqrf and LAPACKE_dorgqr, which the loaded "
                                         "LAPACKE lacks");
  }
  std::vector<double> omega(static_cast<std::size_t>(n) * l), y(static_cast<std::size_t>(m) * l), tau;
  fill_gaussian(omega, options.seed);
  gemm_rm(false, false, m, l, n, a.data(), n, omega.data(), l, y.data(), l);  // Y = A Omega
  orthonormalize(y, m, l, tau);                                               // Q
  std::vector<double>& z = omega;                                             // reused: n x l
  for (int it = 0; it < options.power_iterations; ++it) {
    gemm_rm(true, false, n, l, m, a.data(), n, y.data(), l, z.data(), l);     // Z = A^T Q
    orthonormalize(z, n, l, tau);
    gemm_rm(false, false, m, l, n, a.data(), n, z.data(), l, y.data(), l);    // Y = A Z
    orthonormalize(y, m, l, tau);
  }
  omega.clear();
  omega.shrink_to_fit();
  std::vector<double> b(static_cast<std::size_t>(l) * n);
  gemm_rm(true, false, l, n, m, y.data(), l, a.data(), n, b.data(), n);       // B = Q^T A
  std::vector<double> ub, s, vt;
  svd_thin(b, l, n, ub, s, vt);                                               // B = U~ S V^T, U~ l x l
  TruncatedSvd out;
  out.m = m;
  out.n = n;
  out.rank = rank;
  out.randomized = true;
  out.u.resize(static_cast<std::size_t>(m) * rank);
  gemm_rm(false, false, m, rank, l, y.data(), l, ub.data(), l, out.u.data(), rank);  // U = Q U~[:, :rank]
  out.s.assign(s.begin(), s.begin() + rank);
  out.vt.assign(vt.begin(), vt.begin() + static_cast<std::ptrdiff_t>(rank) * n);
  return out;
}

}  // namespace

TruncatedSvd truncated_svd(const std::vector<double>& a, std::int64_t m64, std::int64_t n64, int rank,
                           const SvdOptions& options) {
  if (m64 < 0 || n64 < 0 || m64 > INT_MAX || n64 > INT_MAX) {
    throw Error(ErrorCode::kInvalidArgument, "truncated_svd: a " + std::to_string(m64) + " x " + std::to_string(n64) +
                                                 " matrix is beyond LAPACK's int dimensions");
  }
  if (rank < 0 || options.oversampling < 0 || options.power_iterations < 0) {
    throw Error(ErrorCode::kInvalidArgument, "truncated_svd: negative rank, oversampling or power iterations");
  }
  if (a.size() != static_cast<std::size_t>(m64) * static_cast<std::size_t>(n64)) {
    throw Error(ErrorCode::kInternal, "truncated_svd: the matrix holds " + std::to_string(a.size()) +
                                          " values, not " + std::to_string(m64 * n64));
  }
  const int m = static_cast<int>(m64), n = static_cast<int>(n64);
  const int k = std::min(m, n);
  rank = std::min(rank, k);
  const int l = static_cast<int>(std::min<std::int64_t>(std::int64_t{rank} + options.oversampling, k));
  bool use_exact = false;
  switch (options.method) {
    case SvdMethod::kExact: use_exact = true; break;
    case SvdMethod::kRandomized: use_exact = l >= k; break;
    case SvdMethod::kAuto: use_exact = k <= kExactSvdMaxDim || 2 * static_cast<std::int64_t>(l) >= k; break;
  }
  if (k == 0 || rank == 0) {
    TruncatedSvd out;
    out.m = m;
    out.n = n;
    return out;
  }
  return use_exact ? exact(a, m, n, rank) : randomized(a, m, n, rank, l, options);
}

}  // namespace taskvec::detail
