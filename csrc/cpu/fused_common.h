// Helpers shared by the fused optimizer-step kernels, fused_momentum.cpp and fused_ns_update.cpp
// (math: limuon_kernels/reference_fused.py).
#pragma once

#include "common.h"

#include <optional>

namespace limuon {

// Elements per staged tile: five tiles of 512 fp64 values are 20 KiB, which stays in L1.
constexpr int64_t kTile = 512;

// t in its accumulation dtype (at least fp32), as the reference's ATen ops compute it.
inline at::Tensor acc(const at::Tensor& t) { return t.to(at::promote_types(t.scalar_type(), at::kFloat)); }

// Whether a one-element skip flag is nonzero (read once, on the CPU).
inline bool skip_is_set(const std::optional<at::Tensor>& skip, const char* op) {
  if (!skip.has_value()) {
    return false;
  }
  check_cpu(*skip, op, "skip");
  TORCH_CHECK(skip->numel() == 1, "limuon::", op, ": skip must have one element, got shape ", skip->sizes());
  const at::Scalar s = skip->item();
  return s.isBoolean() ? s.toBool() : s.toDouble() != 0.0;
}

}  // namespace limuon
