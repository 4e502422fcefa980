// Batched Newton–Schulz orthogonalisation (limuon::newton_schulz).
//
// The work is all in the matmuls, which ATen's BLAS already does well on CPU; what this kernel removes
// is the per-call Python and dispatcher overhead of the reference (three ops per iteration plus the
// normalisation), which dominates for the small and medium matrices of real models. The ATen calls
// mirror reference.newton_schulz one for one, so results match it exactly.
#include "common.h"

#include <torch/library.h>

#include <optional>

namespace limuon {
namespace {

at::Tensor newton_schulz_cpu(const at::Tensor& G, at::ArrayRef<double> coefficients, double eps,
                             double norm_scale, std::optional<at::ScalarType> compute_dtype) {
  constexpr const char* op = "newton_schulz";
  check_matrix(G, op, "G");
  TORCH_CHECK(coefficients.size() % 3 == 0, "limuon::", op,
              ": coefficients must be a flat list of (a, b, c) triples, got ", coefficients.size(),
              " values");
  const at::ScalarType dtype = compute_dtype.value_or(G.scalar_type());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "limuon::", op, ": compute_dtype must be float32, float64, bfloat16 or float16, got ", dtype);

  const int64_t m = G.size(-2), n = G.size(-1);
  at::Tensor X = G.reshape({-1, m, n});
  // Iterate on the side whose Gram matrix X Xᵀ is min(m, n)²: the cost is then O(min² · max).
  const bool transposed = m > n;
  if (transposed) {
    X = X.mT();
  }
  // Normalised in at least fp32 whatever the compute dtype (bf16 sums of m·n squares lose digits), and
  // in fp64 for fp64 input, so that an fp64 run is fp64 throughout.
  const at::Tensor Xf = X.to(at::promote_types(X.scalar_type(), at::kFloat));
  const at::Tensor norms = at::linalg_vector_norm(Xf, 2, at::IntArrayRef{-2, -1}, /*keepdim=*/true);
  X = (Xf / (norms * norm_scale).clamp_min(eps)).to(dtype);

  for (size_t i = 0; i < coefficients.size(); i += 3) {
    const double a = coefficients[i], b = coefficients[i + 1], c = coefficients[i + 2];
    const at::Tensor A = at::bmm(X, X.mT());
    const at::Tensor B = at::baddbmm(A, A, A, /*beta=*/b, /*alpha=*/c);
    X = at::baddbmm(X, B, X, /*beta=*/a, /*alpha=*/1);
  }
  if (transposed) {
    X = X.mT();
  }
  return X.to(G.scalar_type()).reshape(G.sizes()).contiguous();
}

}  // namespace
}  // namespace limuon

TORCH_LIBRARY_IMPL(limuon, CPU, m) {
  m.impl("newton_schulz", &limuon::newton_schulz_cpu);
}
