// Batched Newton–Schulz orthogonalisation: limuon::newton_schulz and limuon::gram_newton_schulz.
//
// The work is all in the matmuls, which ATen's BLAS already does well on CPU; what these kernels remove
// is the per-call Python and dispatcher overhead of the reference (three ops per iteration plus the
// normalisation, five for the Gram form), which dominates for the small and medium matrices of real
// models. The ATen calls mirror reference.newton_schulz / reference.gram_newton_schulz one for one, so
// results match them exactly.
#include "common.h"

#include <torch/library.h>

#include <optional>
#include <utility>
#include <vector>

namespace limuon {
namespace {

at::ScalarType check_ns_args(const at::Tensor& G, at::ArrayRef<double> coefficients,
                             std::optional<at::ScalarType> compute_dtype, const char* op) {
  check_matrix(G, op, "G");
  TORCH_CHECK(coefficients.size() % 3 == 0, "limuon::", op,
              ": coefficients must be a flat list of (a, b, c) triples, got ", coefficients.size(),
              " values");
  const at::ScalarType dtype = compute_dtype.value_or(G.scalar_type());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "limuon::", op, ": compute_dtype must be float32, float64, bfloat16 or float16, got ", dtype);
  return dtype;
}

// G (..., m, n) as X (B, p, q), p = min(m, n), normalised per matrix by 1 / max(norm_scale·‖G‖_F, eps).
// The norm and the division run in at least fp32 (fp64 for fp64 input) before the cast to the compute
// dtype: cast first, and an fp16 gradient of 1e-6-sized entries would lose its digits (fp16's smallest
// normal is 6e-5). Returns X and whether it is G transposed.
std::pair<at::Tensor, bool> ns_input(const at::Tensor& G, double eps, double norm_scale, at::ScalarType dtype) {
  const int64_t m = G.size(-2), n = G.size(-1);
  at::Tensor X = G.reshape({-1, m, n});
  // Iterate on the side whose Gram matrix X Xᵀ is min(m, n)²: the cost is then O(min² · max).
  const bool transposed = m > n;
  if (transposed) {
    X = X.mT();
  }
  const at::Tensor Xf = X.to(at::promote_types(X.scalar_type(), at::kFloat));
  const at::Tensor norms = at::linalg_vector_norm(Xf, 2, at::IntArrayRef{-2, -1}, /*keepdim=*/true);
  return {(Xf / (norms * norm_scale).clamp_min(eps)).to(dtype), transposed};
}

at::Tensor ns_output(at::Tensor X, bool transposed, const at::Tensor& G) {
  if (transposed) {
    X = X.mT();
  }
  return X.to(G.scalar_type()).reshape(G.sizes()).contiguous();
}

// b·A + c·A·A. Not baddbmm with alpha = 0: ATen's CPU baddbmm in bf16/fp16 then returns A unscaled
// (torch 2.13), which breaks the classic cubic iteration (c = 0) in half precision.
at::Tensor sym_poly(const at::Tensor& A, double b, double c) {
  return c == 0.0 ? A * b : at::baddbmm(A, A, A, /*beta=*/b, /*alpha=*/c);
}

at::Tensor newton_schulz_cpu(const at::Tensor& G, at::ArrayRef<double> coefficients, double eps,
                             double norm_scale, std::optional<at::ScalarType> compute_dtype) {
  const at::ScalarType dtype = check_ns_args(G, coefficients, compute_dtype, "newton_schulz");
  auto [X, transposed] = ns_input(G, eps, norm_scale, dtype);
  return ns_output(ns_iterate(X, coefficients), transposed, G);
}

// X Xᵀ in the state dtype (half-precision products are exact in fp32, as on tensor cores).
at::Tensor gram(const at::Tensor& X, at::ScalarType state) {
  const at::Tensor Xs = X.to(state);
  return at::bmm(Xs, Xs.mT());
}

at::Tensor gram_newton_schulz_cpu(const at::Tensor& G, at::ArrayRef<double> coefficients, double eps,
                                  double norm_scale, std::optional<at::ScalarType> compute_dtype,
                                  at::IntArrayRef restarts) {
  constexpr const char* op = "gram_newton_schulz";
  const at::ScalarType dtype = check_ns_args(G, coefficients, compute_dtype, op);
  auto [X, transposed] = ns_input(G, eps, norm_scale, dtype);
  return ns_output(gram_ns_iterate(X, coefficients, restarts, op), transposed, G);
}

}  // namespace

// The iterations of newton_schulz on a normalised X (B, p, q), p ≤ q, in X's dtype (reference.ns_iterate).
at::Tensor ns_iterate(at::Tensor X, at::ArrayRef<double> coefficients) {
  for (size_t i = 0; i + 2 < coefficients.size(); i += 3) {
    const double a = coefficients[i], b = coefficients[i + 1], c = coefficients[i + 2];
    const at::Tensor A = at::bmm(X, X.mT());
    X = at::baddbmm(X, sym_poly(A, b, c), X, /*beta=*/a, /*alpha=*/1);
  }
  return X;
}

// Newton–Schulz on the p×p Gram matrix (see reference.gram_newton_schulz for the derivation):
// R = X Xᵀ, Q = I; per iteration P = a·I + b·R + c·R², Q ← P·Q, R ← R·P² (upper triangle mirrored);
// after each iteration listed in `restarts`, X ← Q·X, R ← X Xᵀ, Q ← I; the result is Q·X. R, P and Q
// are kept in at least fp32. X: normalised (B, p, q), p ≤ q, in the compute dtype (reference.gram_ns_iterate).
at::Tensor gram_ns_iterate(at::Tensor X, at::ArrayRef<double> coefficients, at::IntArrayRef restarts,
                           const char* op) {
  const int64_t steps = static_cast<int64_t>(coefficients.size() / 3);
  std::vector<bool> restart_after(steps + 1, false);
  int64_t previous = 0;
  for (const int64_t r : restarts) {
    TORCH_CHECK(r > previous && r < steps, "limuon::", op,
                ": restarts must be increasing iteration counts in [1, steps - 1] = [1, ", steps - 1,
                "], got ", restarts);
    restart_after[r] = true;
    previous = r;
  }
  const at::ScalarType dtype = X.scalar_type();
  const at::ScalarType state = at::promote_types(dtype, at::kFloat);
  at::Tensor R = gram(X, state);
  std::optional<at::Tensor> Q;  // empty: the identity
  for (int64_t k = 0; k < steps; ++k) {
    const double a = coefficients[3 * k], b = coefficients[3 * k + 1], c = coefficients[3 * k + 2];
    at::Tensor P = sym_poly(R, b, c);
    P.diagonal(0, -2, -1).add_(a);
    Q = Q.has_value() ? at::bmm(P, *Q) : P;
    if (restart_after[k + 1]) {
      X = at::bmm(Q->to(dtype), X);
      R = gram(X, state);
      Q.reset();
    } else if (k + 1 < steps) {
      R = at::bmm(R, at::bmm(P, P));
      R = R.triu() + R.triu(1).mT();  // symmetric again, as in the reference (why: see there)
    }
  }
  if (Q.has_value()) {
    X = at::bmm(Q->to(dtype), X);
  }
  return X;
}

}  // namespace limuon

TORCH_LIBRARY_IMPL(limuon, CPU, m) {
  m.impl("newton_schulz", &limuon::newton_schulz_cpu);
  m.impl("gram_newton_schulz", &limuon::gram_newton_schulz_cpu);
}
