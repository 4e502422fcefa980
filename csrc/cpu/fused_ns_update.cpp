// The fused Newton–Schulz step: limuon::newton_schulz_update_ (math: limuon_kernels/reference_fused.py;
// the momentum ops that produce its X and sqnorm are in fused_momentum.cpp).
//
// newton_schulz_update_ normalises X by the given norms (no norm pass), iterates with newton_schulz.cpp's
// ns_iterate / gram_ns_iterate (the same ATen matmuls as the reference, so the same bits), and applies
// the update in one tiled pass per parameter, with the restore buffer delta written in the same pass.
//
// Where the reference mixes precisions within one formula (an fp64 operand next to a narrower one: its
// products are then rounded in the narrower operand's fp32 before the fp64 sum), the kernels run the
// reference's own ATen ops instead; that case is rare and the fast path would not match it bit for bit.
#include "fused_common.h"

#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace limuon {
namespace {

// -- Newton–Schulz with the parameter update -----------------------------------------------------

// delta ← w·c3 + c2·o (when d is given), w ← w·c1 − c2·o over count elements (w_out may be w).
template <typename opmath_t>
void update_tile(const opmath_t* w, const opmath_t* o, opmath_t* w_out, opmath_t* d, int64_t count, opmath_t c1,
                 opmath_t c2, opmath_t c3) {
  using Vec = at::vec::Vectorized<opmath_t>;
  constexpr int64_t kWidth = Vec::size();
  const Vec c1v(c1), c2v(c2), c3v(c3);
  int64_t i = 0;
  for (; i + kWidth <= count; i += kWidth) {
    const Vec wv = Vec::loadu(w + i), step = c2v * Vec::loadu(o + i);
    if (d != nullptr) {
      (wv * c3v + step).store(d + i);
    }
    (wv * c1v - step).store(w_out + i);
  }
  for (; i < count; ++i) {
    const opmath_t wi = w[i], step = c2 * o[i];
    if (d != nullptr) {
      d[i] = wi * c3 + step;
    }
    w_out[i] = wi * c1 - step;
  }
}

// W ← W·c1 − c2·O (and delta) over one parameter's `count` elements, O and delta taken from off.
template <typename opmath_t>
void update_param(const Buffer& w, const Buffer& o, const Buffer& d, int64_t off, int64_t count, opmath_t c1,
                  opmath_t c2, opmath_t c3) {
  at::parallel_for(0, count, kGrainSize, [&](int64_t begin, int64_t end) {
    __at_align__ opmath_t tw[kTile], to[kTile], tn[kTile], td[kTile];
    for (int64_t i = begin; i < end; i += kTile) {
      const int64_t k = std::min(kTile, end - i);
      const opmath_t* wv = read_tile(w, i, k, tw);
      const opmath_t* ov = read_tile(o, off + i, k, to);
      opmath_t* nv = out_tile(w, i, tn);
      opmath_t* dv = d.ptr != nullptr ? out_tile(d, off + i, td) : nullptr;
      update_tile(wv, ov, nv, dv, k, c1, c2, c3);
      write_tile(w, i, k, nv);
      if (dv != nullptr) {
        write_tile(d, off + i, k, dv);
      }
    }
  });
}

// The reference's epilogue in its own ATen ops: for parameters whose dtype mixes fp64 with fp32 math.
void update_aten(const at::Tensor& O, at::TensorList W, const at::Tensor& lr, double wd, double scale,
                 const std::optional<at::Tensor>& delta, int64_t m, int64_t n) {
  const at::Tensor lr_t = lr.to(O.scalar_type());
  std::vector<at::Tensor> rows;
  for (const at::Tensor& w : W) {
    rows.push_back(acc(w).reshape({-1, m, n}));
  }
  if (delta.has_value()) {
    delta->copy_(at::cat(rows) * (lr_t * wd) + (lr_t * scale) * O);
  }
  int64_t k0 = 0;
  for (size_t j = 0; j < W.size(); ++j) {
    const int64_t c = rows[j].size(0);
    const at::Tensor o = O.narrow(0, k0, c).reshape(W[j].sizes());
    W[j].copy_(acc(W[j]) * (1.0 - lr_t * wd) - (lr_t * scale) * o);
    k0 += c;
  }
}

void check_update_args(const at::Tensor& X, const at::Tensor& sqnorm, at::TensorList W, const at::Tensor& lr,
                       at::ArrayRef<double> coefficients, const std::optional<at::Tensor>& delta, const char* op) {
  check_matrix(X, op, "X");
  TORCH_CHECK(X.dim() == 3, "limuon::", op, ": X must have shape (B, m, n), got ", X.sizes());
  const int64_t B = X.size(0), mn = X.size(1) * X.size(2);
  check_shape(sqnorm, {B}, op, "sqnorm", "X", X);
  TORCH_CHECK(!coefficients.empty() && coefficients.size() % 3 == 0, "limuon::", op,
              ": coefficients must be a flat list of (a, b, c) triples, got ", coefficients.size(), " values");
  int64_t total = 0;
  for (const at::Tensor& w : W) {
    check_float(w, op, "W");
    TORCH_CHECK(w.numel() % mn == 0, "limuon::", op, ": every W must hold whole ", X.size(1), "×", X.size(2),
                " matrices, got ", w.sizes());
    total += w.numel() / mn;
  }
  TORCH_CHECK(total == B, "limuon::", op, ": W must hold the ", B, " matrices of X, got ", total);
  if (delta.has_value()) {
    check_shape(*delta, X.sizes(), op, "delta", "X", X);
  }
  check_cpu(lr, op, "lr");
}

// W ← W·(1 − lr·wd) − lr·scale·O and delta ← W·lr·wd + lr·scale·O, one pass per parameter; O (B, m, n)
// contiguous in a dtype whose compute type is scalar_t, every W of that compute type too.
template <typename scalar_t>
void apply_update(const at::Tensor& O, at::TensorList W, const at::Tensor& lr, double weight_decay, double scale,
                  const std::optional<at::Tensor>& delta) {
  const at::ScalarType acc_t = c10::CppTypeToScalarType<scalar_t>::value;
  // lr read once, rounded to O's dtype as the reference's lr.to(O.dtype); each coefficient is then one
  // op of that dtype, as the reference's 0-d tensor arithmetic
  const scalar_t lr_v = lr.to(acc_t).item<scalar_t>();
  const scalar_t c3 = lr_v * static_cast<scalar_t>(weight_decay);
  const scalar_t c1 = static_cast<scalar_t>(1) - c3, c2 = lr_v * static_cast<scalar_t>(scale);
  at::Tensor d_work;  // delta itself, or a working copy in acc_t (write-only: not filled)
  if (delta.has_value()) {
    d_work = delta->is_contiguous() && opmath_dtype(delta->scalar_type()) == acc_t
                 ? *delta
                 : at::empty(O.sizes(), O.options().dtype(acc_t));
  }
  const Buffer o = buffer_of(O), d = delta.has_value() ? buffer_of(d_work) : Buffer{};
  int64_t off = 0;
  for (const at::Tensor& w : W) {
    at::Tensor state = w.contiguous();  // a non-contiguous parameter: a copy, written back below
    update_param<scalar_t>(buffer_of(state), o, d, off, state.numel(), c1, c2, c3);
    if (!state.is_same(w)) {
      w.copy_(state.view(w.sizes()));
    }
    off += state.numel();
  }
  if (delta.has_value() && !d_work.is_same(*delta)) {
    delta->copy_(d_work);
  }
}

void newton_schulz_update_cpu(const at::Tensor& X, const at::Tensor& sqnorm, at::TensorList W, const at::Tensor& lr,
                              double weight_decay, double scale, at::ArrayRef<double> coefficients, double eps,
                              double norm_scale, std::optional<at::ScalarType> compute_dtype,
                              at::OptionalIntArrayRef restarts, const std::optional<at::Tensor>& skip,
                              const std::optional<at::Tensor>& delta) {
  constexpr const char* op = "newton_schulz_update_";
  if (skip_is_set(skip, op)) {
    return;  // before any work: a skipped step costs one flag read
  }
  check_update_args(X, sqnorm, W, lr, coefficients, delta, op);
  const int64_t m = X.size(1), n = X.size(2);
  const at::ScalarType dtype = compute_dtype.value_or(X.scalar_type());
  const at::ScalarType acc_t = opmath_dtype(X.scalar_type());
  // X / max(norm_scale·√sqnorm, eps) in the accumulation dtype, then cast: the reference's ops one for one
  const at::Tensor denom = (sqnorm.to(acc_t).sqrt() * norm_scale).clamp_min(eps).reshape({-1, 1, 1});
  const bool transposed = m > n;
  at::Tensor Xn = (X.to(acc_t) / denom).to(dtype);
  if (transposed) {
    Xn = Xn.mT();
  }
  at::Tensor O =
      restarts.has_value() ? gram_ns_iterate(Xn, coefficients, *restarts, op) : ns_iterate(Xn, coefficients);
  if (transposed) {
    O = O.mT();
  }
  // The epilogue reads O in the accumulation dtype: a bf16/fp16 O is widened tile by tile, exactly
  O = (opmath_dtype(O.scalar_type()) == acc_t ? O : O.to(acc_t)).contiguous();
  for (const at::Tensor& w : W) {
    if (opmath_dtype(w.scalar_type()) != acc_t) {
      return update_aten(O.to(acc_t), W, lr, weight_decay, scale, delta, m, n);
    }
  }
  AT_DISPATCH_FLOATING_TYPES(acc_t, "limuon::newton_schulz_update_",
                             [&] { apply_update<scalar_t>(O, W, lr, weight_decay, scale, delta); });
}

}  // namespace
}  // namespace limuon

TORCH_LIBRARY_IMPL(limuon, CPU, m) {
  m.impl("newton_schulz_update_", &limuon::newton_schulz_update_cpu);
}
