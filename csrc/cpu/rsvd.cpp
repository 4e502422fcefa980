// Batched randomized SVD (limuon::rsvd), Halko–Martinsson–Tropp, in fp32.
//
// Same algorithm and the same ATen calls as reference.rsvd, so U, S and V match it exactly. The one
// contract that crosses languages is the Gaussian sketch: Ω of matrix i must be bit-identical to
// reference.gaussian_sketch(n, k, seeds[i]), i.e. torch.randn(n, k) from a CPU generator seeded with
// seeds[i]. A fresh CPUGeneratorImpl(seed) is in the state manual_seed(seed) leaves, and randn is
// normal_(0, 1) on a new tensor, so filling each contiguous slice of Ω with normal_ draws the same
// numbers without a per-matrix temporary and a stack copy.
#include "common.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace limuon {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_cpu(const at::Tensor& M, int64_t rank,
                                                         int64_t oversample, int64_t power_iters,
                                                         at::IntArrayRef seeds) {
  constexpr const char* op = "rsvd";
  check_matrix(M, op, "M");
  const int64_t m = M.size(-2), n = M.size(-1);
  const int64_t batch = M.numel() / (m * n);
  TORCH_CHECK(rank >= 1 && rank <= std::min(m, n), "limuon::", op, ": rank must be in [1, min(m, n) = ",
              std::min(m, n), "] for M of shape ", M.sizes(), ", got ", rank);
  TORCH_CHECK(oversample >= 0, "limuon::", op, ": oversample must be >= 0, got ", oversample);
  TORCH_CHECK(power_iters >= 0, "limuon::", op, ": power_iters must be >= 0, got ", power_iters);
  TORCH_CHECK(static_cast<int64_t>(seeds.size()) == batch, "limuon::", op, ": seeds must hold one seed per matrix (",
              batch, " for M of shape ", M.sizes(), "), got ", seeds.size());

  const at::Tensor Mb = M.reshape({batch, m, n}).to(at::kFloat);
  const int64_t k = std::min({rank + oversample, m, n});
  at::Tensor omega = at::empty({batch, n, k}, Mb.options());
  for (int64_t i = 0; i < batch; ++i) {
    TORCH_CHECK(seeds[i] >= 0, "limuon::", op, ": seeds must be in [0, 2**63), got ", seeds[i],
                " for matrix ", i);
    at::Generator gen = at::detail::createCPUGenerator(static_cast<uint64_t>(seeds[i]));
    omega.select(0, i).normal_(0.0, 1.0, gen);
  }

  at::Tensor Y = at::bmm(Mb, omega);
  for (int64_t it = 0; it < power_iters; ++it) {
    const at::Tensor Q = std::get<0>(at::linalg_qr(Y));
    const at::Tensor Z = std::get<0>(at::linalg_qr(at::bmm(Mb.mT(), Q)));
    Y = at::bmm(Mb, Z);
  }
  const at::Tensor Q = std::get<0>(at::linalg_qr(Y));
  const at::Tensor B = at::bmm(Q.mT(), Mb);
  const auto [Ub, S, Vh] = at::linalg_svd(B, /*full_matrices=*/false);
  const at::Tensor U = at::bmm(Q, Ub.narrow(-1, 0, rank));

  c10::DimVector shape(M.sizes().begin(), M.sizes().end() - 2);
  shape.push_back(rank);
  at::Tensor S_out = S.narrow(-1, 0, rank).reshape(shape).contiguous();
  shape.back() = m;
  shape.push_back(rank);
  at::Tensor U_out = U.reshape(shape).contiguous();
  shape[shape.size() - 2] = n;
  at::Tensor V_out = Vh.narrow(-2, 0, rank).mT().reshape(shape).contiguous();
  return {std::move(U_out), std::move(S_out), std::move(V_out)};
}

}  // namespace
}  // namespace limuon

TORCH_LIBRARY_IMPL(limuon, CPU, m) {
  m.impl("rsvd", &limuon::rsvd_cpu);
}
