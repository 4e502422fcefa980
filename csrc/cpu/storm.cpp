// STORM and MARS momentum updates (limuon::storm_update_, limuon::mars_update_).
//
// Both are memory-bound, so each is one pass: every input element is read once and every output
// element written once, where eager PyTorch makes three or four passes with temporaries. (Operands
// that are non-contiguous or of another dtype are first copied into contiguous ones.) Arithmetic
// runs in fp32 (fp64 when any operand is fp64) in the reference's operation order and is rounded once
// on store, so results match reference.py bit for bit, NaN payloads aside.
#include "common.h"

#include <torch/library.h>

namespace limuon {
namespace {

// m ← g_new + μ(m − g_old), m in its working dtype scalar_t. grad_t is scalar_t, or its compute type
// when a gradient's dtype differs from it (see operand_dtype).
template <typename scalar_t, typename grad_t>
void storm_kernel(scalar_t* m, const grad_t* g_new, const grad_t* g_old, int64_t numel,
                  double momentum) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = typename Lanes<scalar_t>::Vec;
  constexpr int64_t kStep = Lanes<scalar_t>::kStep;
  static_assert(Lanes<grad_t>::kStep == kStep, "operands must share the compute type");
  const opmath_t mu = static_cast<opmath_t>(momentum);
  const Vec mu_v(mu);
  at::parallel_for(0, numel, kGrainSize, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + kStep <= end; i += kStep) {
      Vec m0, m1, n0, n1, o0, o1;
      Lanes<scalar_t>::load(m + i, m0, m1);
      Lanes<grad_t>::load(g_new + i, n0, n1);
      Lanes<grad_t>::load(g_old + i, o0, o1);
      Lanes<scalar_t>::store(m + i, n0 + mu_v * (m0 - o0), n1 + mu_v * (m1 - o1));
    }
    for (; i < end; ++i) {
      const opmath_t diff = static_cast<opmath_t>(m[i]) - static_cast<opmath_t>(g_old[i]);
      m[i] = static_cast<scalar_t>(static_cast<opmath_t>(g_new[i]) + mu * diff);
    }
  });
}

// b ← μb + c·g with c = (1−γ)(1−μ)/μ, in place; out ← γg + μb from the unrounded new b.
template <typename scalar_t, typename grad_t>
void mars_kernel(scalar_t* b, const grad_t* g, grad_t* out, int64_t numel, double momentum,
                 double gamma) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = typename Lanes<scalar_t>::Vec;
  constexpr int64_t kStep = Lanes<scalar_t>::kStep;
  static_assert(Lanes<grad_t>::kStep == kStep, "operands must share the compute type");
  // c in double, then rounded once: the reference computes it as a Python float.
  const opmath_t mu = static_cast<opmath_t>(momentum);
  const opmath_t c = static_cast<opmath_t>((1.0 - gamma) * (1.0 - momentum) / momentum);
  const opmath_t gam = static_cast<opmath_t>(gamma);
  const Vec mu_v(mu), c_v(c), gam_v(gam);
  at::parallel_for(0, numel, kGrainSize, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + kStep <= end; i += kStep) {
      Vec b0, b1, g0, g1;
      Lanes<scalar_t>::load(b + i, b0, b1);
      Lanes<grad_t>::load(g + i, g0, g1);
      b0 = mu_v * b0 + c_v * g0;
      b1 = mu_v * b1 + c_v * g1;
      Lanes<scalar_t>::store(b + i, b0, b1);
      Lanes<grad_t>::store(out + i, gam_v * g0 + mu_v * b0, gam_v * g1 + mu_v * b1);
    }
    for (; i < end; ++i) {
      const opmath_t gi = static_cast<opmath_t>(g[i]);
      const opmath_t bi = mu * static_cast<opmath_t>(b[i]) + c * gi;
      b[i] = static_cast<scalar_t>(bi);
      out[i] = static_cast<grad_t>(gam * gi + mu * bi);
    }
  });
}

void storm_update_cpu(const at::Tensor& m, const at::Tensor& g_new, const at::Tensor& g_old,
                      double momentum) {
  constexpr const char* op = "storm_update_";
  check_float(m, op, "m");
  check_same_shape(g_new, m, op, "g_new", "m");
  check_same_shape(g_old, m, op, "g_old", "m");
  const at::ScalarType work = working_dtype(m.scalar_type(), compute_dtype({m, g_new, g_old}));
  const at::ScalarType grad_dtype = operand_dtype(work, {g_new, g_old});
  const at::Tensor gn = contiguous_as(g_new, grad_dtype);
  const at::Tensor go = contiguous_as(g_old, grad_dtype);
  // m itself when it is contiguous in its working dtype; else a copy, written back once at the end.
  at::Tensor state = contiguous_as(m, work);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, work, "limuon::storm_update_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    if (grad_dtype == work) {
      storm_kernel<scalar_t, scalar_t>(state.data_ptr<scalar_t>(), gn.const_data_ptr<scalar_t>(),
                                       go.const_data_ptr<scalar_t>(), state.numel(), momentum);
    } else {
      storm_kernel<scalar_t, opmath_t>(state.data_ptr<scalar_t>(), gn.const_data_ptr<opmath_t>(),
                                       go.const_data_ptr<opmath_t>(), state.numel(), momentum);
    }
  });
  if (!state.is_same(m)) {
    m.copy_(state);
  }
}

at::Tensor mars_update_cpu(const at::Tensor& b, const at::Tensor& g, double momentum, double gamma) {
  constexpr const char* op = "mars_update_";
  check_float(b, op, "b");
  check_same_shape(g, b, op, "g", "b");
  TORCH_CHECK(momentum != 0.0, "limuon::", op, ": momentum must be nonzero (the update divides by it)");
  const at::ScalarType work = working_dtype(b.scalar_type(), compute_dtype({b, g}));
  const at::ScalarType grad_dtype = operand_dtype(work, {g});
  const at::Tensor gc = contiguous_as(g, grad_dtype);
  at::Tensor out = at::empty(g.sizes(), g.options().dtype(grad_dtype));
  at::Tensor state = contiguous_as(b, work);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, work, "limuon::mars_update_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    if (grad_dtype == work) {
      mars_kernel<scalar_t, scalar_t>(state.data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
                                      out.data_ptr<scalar_t>(), state.numel(), momentum, gamma);
    } else {
      mars_kernel<scalar_t, opmath_t>(state.data_ptr<scalar_t>(), gc.const_data_ptr<opmath_t>(),
                                      out.data_ptr<opmath_t>(), state.numel(), momentum, gamma);
    }
  });
  if (!state.is_same(b)) {
    b.copy_(state);
  }
  // Only when g's dtype differs from the working dtype: the result is computed there, and the op
  // returns g's dtype.
  return out.scalar_type() == g.scalar_type() ? out : out.to(g.scalar_type());
}

}  // namespace
}  // namespace limuon

TORCH_LIBRARY_IMPL(limuon, CPU, m) {
  m.impl("storm_update_", &limuon::storm_update_cpu);
  m.impl("mars_update_", &limuon::mars_update_cpu);
}
