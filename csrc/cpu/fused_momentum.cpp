// The fused momentum kernels: limuon::momentum_ns_input_ and limuon::lowrank_momentum_ns_input
// (math: limuon_kernels/reference_fused.py; newton_schulz_update_ is in fused_ns_update.cpp).
//
// Both are one pass: every operand element is read once and the new momentum, the
// Newton–Schulz input X and the per-matrix ‖X‖² are produced from it, where the unfused step makes a
// momentum pass, a cast and a separate norm pass. Work runs in tiles of kTile elements staged in the
// compute type (fp32, fp64 for fp64 operands) in L1; fp32/fp64 operands are used in place, bf16/fp16
// ones are converted on the way in and rounded once on the way out. The arithmetic is the reference's,
// in its order and without contraction (setup.py: -ffp-contract=off), so the elementwise outputs match
// it bit for bit. ‖X‖² is summed per fixed chunk of each matrix, then the chunks in order: the result
// does not depend on the thread count. The low-rank op rebuilds U diag(S) Vᵀ kBlockRows rows at a time
// into one per-thread buffer (never a whole matrix) and runs the same pass on those rows while they are hot.
//
// Where the reference mixes precisions within one formula (an fp64 operand next to a narrower one: its
// products are then rounded in the narrower operand's fp32 before the fp64 sum), the kernels run the
// reference's own ATen ops instead; that case is rare and the fast path would not match it bit for bit.
#include "fused_common.h"

#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

namespace limuon {
namespace {

// ‖X‖² is accumulated per chunk of this many elements of one matrix (the unit of parallel work).
constexpr int64_t kChunk = 65536;
// Rows of U diag(S) Vᵀ rebuilt at a time by the low-rank op (as lowrank.cpp: 64 × 768 fp32 = 192 KiB).
constexpr int64_t kBlockRows = 64;

bool is_double(const at::Tensor& t) { return t.scalar_type() == at::kDouble; }

// -- momentum → Newton–Schulz input ---------------------------------------------------------------

template <typename opmath_t>
struct Coefs {
  opmath_t alpha, beta, delta, rho, sigma;
};

// Over count elements: new = (α·prev + β·g) + δ·g_old, X = ρ·new + σ·g (the reference's order: α·prev
// only with kPrev, δ·g_old only with kOld). Returns Σ X² of the unrounded X, its lanes summed in order.
template <typename opmath_t, bool kPrev, bool kOld>
opmath_t momentum_tile(const opmath_t* prev, const opmath_t* g, const opmath_t* g_old, opmath_t* nw, opmath_t* x,
                       int64_t count, const Coefs<opmath_t>& c) {
  using Vec = at::vec::Vectorized<opmath_t>;
  constexpr int64_t kWidth = Vec::size();
  const Vec a(c.alpha), b(c.beta), d(c.delta), r(c.rho), s(c.sigma);
  Vec sq(0);
  int64_t i = 0;
  for (; i + kWidth <= count; i += kWidth) {
    const Vec gv = Vec::loadu(g + i);
    Vec n = b * gv;
    if constexpr (kPrev) {
      n = a * Vec::loadu(prev + i) + n;
    }
    if constexpr (kOld) {
      n = n + d * Vec::loadu(g_old + i);
    }
    const Vec xv = r * n + s * gv;
    n.store(nw + i);  // nw may be prev itself: every lane was read above
    xv.store(x + i);
    sq = sq + xv * xv;
  }
  __at_align__ opmath_t lanes[kWidth];
  sq.store(lanes);
  opmath_t sum = 0;
  for (int64_t k = 0; k < kWidth; ++k) {
    sum += lanes[k];
  }
  for (; i < count; ++i) {
    opmath_t n = c.beta * g[i];
    if constexpr (kPrev) {
      n = c.alpha * prev[i] + n;
    }
    if constexpr (kOld) {
      n = n + c.delta * g_old[i];
    }
    const opmath_t xi = c.rho * n + c.sigma * g[i];
    nw[i] = n;
    x[i] = xi;
    sum += xi * xi;
  }
  return sum;
}

// The operands of one momentum pass: contiguous, flat, indexed alike.
template <typename opmath_t>
struct MomentumPass {
  Buffer prev;   // the dense momentum read (absent when α = 0, or when the caller passes its own block)
  Buffer g, g_old;  // g_old absent: None
  Buffer nw;     // where the new momentum goes; absent: computed for X, not stored (skip)
  Buffer x;
  Coefs<opmath_t> c;

  // Σ X² over elements [off, off + count), in double. prev_block, when given, holds prev of exactly
  // these elements (the low-rank op's rebuilt rows).
  double run(int64_t off, int64_t count, const opmath_t* prev_block) const {
    __at_align__ opmath_t tp[kTile], tg[kTile], to[kTile], tn[kTile], tx[kTile];
    const bool has_prev = prev_block != nullptr || prev.ptr != nullptr;
    const bool has_old = g_old.ptr != nullptr;
    auto* tile = has_prev ? (has_old ? &momentum_tile<opmath_t, true, true> : &momentum_tile<opmath_t, true, false>)
                          : (has_old ? &momentum_tile<opmath_t, false, true> : &momentum_tile<opmath_t, false, false>);
    double sum = 0.0;
    for (int64_t t = 0; t < count; t += kTile) {
      const int64_t k = std::min(kTile, count - t), i = off + t;
      const opmath_t* p = prev_block != nullptr ? prev_block + t
                          : prev.ptr != nullptr ? read_tile(prev, i, k, tp)
                                                : nullptr;
      const opmath_t* gv = read_tile(g, i, k, tg);
      const opmath_t* ov = has_old ? read_tile(g_old, i, k, to) : nullptr;
      opmath_t* nv = nw.ptr != nullptr ? out_tile(nw, i, tn) : tn;
      opmath_t* xv = out_tile(x, i, tx);
      sum += static_cast<double>(tile(p, gv, ov, nv, xv, k, c));
      if (nw.ptr != nullptr) {
        write_tile(nw, i, k, nv);
      }
      write_tile(x, i, k, xv);
    }
    return sum;
  }
};

template <typename opmath_t>
Coefs<opmath_t> coefs_of(at::ArrayRef<double> c) {
  // Each rounded once to the compute type, as a Python float meets an fp32 tensor in the reference.
  return {static_cast<opmath_t>(c[0]), static_cast<opmath_t>(c[1]), static_cast<opmath_t>(c[2]),
          static_cast<opmath_t>(c[3]), static_cast<opmath_t>(c[4])};
}

void check_coefficients(at::ArrayRef<double> c, const char* op) {
  TORCH_CHECK(c.size() == 5, "limuon::", op, ": coefficients must be [alpha, beta, delta, rho, sigma], got ",
              c.size(), " values");
}

// The reference's _momentum in its own ATen ops: the path for operands that mix fp64 with narrower ones.
std::pair<at::Tensor, at::Tensor> momentum_aten(const std::optional<at::Tensor>& prev, const at::Tensor& g,
                                                const std::optional<at::Tensor>& g_old, at::ArrayRef<double> c) {
  const at::Tensor gf = acc(g);
  at::Tensor nw = gf * c[1];
  if (prev.has_value()) {
    nw = *prev * c[0] + nw;
  }
  if (g_old.has_value()) {
    nw = nw + acc(*g_old) * c[2];
  }
  return {nw, nw * c[3] + gf * c[4]};
}

at::Tensor sqnorm_aten(const at::Tensor& X) { return X.square().sum(at::IntArrayRef{-2, -1}); }

// The compute dtype's outputs: X in x_dtype when its compute type is ct (else in ct, cast after), sqnorm.
std::pair<at::Tensor, at::Tensor> new_outputs(const at::Tensor& g, at::ScalarType x_dtype, at::ScalarType ct) {
  const at::ScalarType xd = opmath_dtype(x_dtype) == ct ? x_dtype : ct;
  return {at::empty(g.sizes(), g.options().dtype(xd)),
          at::empty(g.sizes().slice(0, g.dim() - 2), g.options().dtype(ct))};
}

// sqnorm[b] = Σ_k partials[b·per + k], in order (deterministic whatever the threads did).
void reduce_partials(const std::vector<double>& partials, int64_t per, at::Tensor& sqnorm) {
  at::Tensor sums = at::empty({static_cast<int64_t>(partials.size()) / per}, sqnorm.options().dtype(at::kDouble));
  double* s = sums.data_ptr<double>();
  for (int64_t b = 0; b < sums.numel(); ++b) {
    double total = 0.0;
    for (int64_t k = 0; k < per; ++k) {
      total += partials[b * per + k];
    }
    s[b] = total;
  }
  sqnorm.copy_(sums.reshape(sqnorm.sizes()));
}

// buf itself when it is contiguous in its working dtype, else a working copy, filled only when read (α ≠ 0).
at::Tensor momentum_state(const at::Tensor& buf, at::ScalarType work, bool read) {
  if (read) {
    return contiguous_as(buf, work);
  }
  return buf.is_contiguous() && buf.scalar_type() == work ? buf : at::empty(buf.sizes(), buf.options().dtype(work));
}

// The dense pass over matrices of mn elements, each in `chunks` fixed chunks of kChunk: partials[b·chunks + k].
template <typename opmath_t>
void run_chunks(const MomentumPass<opmath_t>& pass, int64_t mn, int64_t chunks, std::vector<double>& partials) {
  at::parallel_for(0, static_cast<int64_t>(partials.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t start = (u % chunks) * kChunk;
      partials[u] = pass.run((u / chunks) * mn + start, std::min(kChunk, mn - start), nullptr);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> momentum_ns_input_cpu(const at::Tensor& buf, const at::Tensor& g,
                                                         const std::optional<at::Tensor>& g_old,
                                                         at::ArrayRef<double> coefficients, at::ScalarType x_dtype,
                                                         const std::optional<at::Tensor>& skip) {
  constexpr const char* op = "momentum_ns_input_";
  check_matrix(g, op, "g");
  check_same_shape(buf, g, op, "buf", "g");
  if (g_old.has_value()) {
    check_same_shape(*g_old, g, op, "g_old", "g");
  }
  check_coefficients(coefficients, op);
  const bool skipped = skip_is_set(skip, op);
  const bool use_prev = coefficients[0] != 0.0;  // α = 0: buf is not read
  const bool any_double = is_double(g) || (g_old.has_value() && is_double(*g_old)) || (use_prev && is_double(buf));
  const bool all_double = is_double(g) && (!g_old.has_value() || is_double(*g_old)) && (!use_prev || is_double(buf));
  if (any_double && !all_double) {
    auto [nw, X] = momentum_aten(use_prev ? std::optional<at::Tensor>(acc(buf)) : std::nullopt, g, g_old, coefficients);
    if (!skipped) {
      buf.copy_(nw);
    }
    return {X.to(x_dtype).contiguous(), sqnorm_aten(X)};
  }
  const at::ScalarType ct = any_double ? at::kDouble : at::kFloat;
  const at::Tensor gc = g.contiguous();
  const at::Tensor oc = g_old.has_value() ? g_old->contiguous() : at::Tensor();
  at::Tensor state = momentum_state(buf, working_dtype(buf.scalar_type(), ct), use_prev);
  at::Tensor X, sqnorm;  // (not a structured binding: C++17 lambdas cannot capture one)
  std::tie(X, sqnorm) = new_outputs(g, x_dtype, ct);
  const int64_t mn = g.size(-2) * g.size(-1), batch = g.numel() / mn;
  const int64_t chunks = (mn + kChunk - 1) / kChunk;
  std::vector<double> partials(batch * chunks);
  AT_DISPATCH_FLOATING_TYPES(ct, "limuon::momentum_ns_input_", [&] {
    const MomentumPass<scalar_t> pass{use_prev ? buffer_of(state) : Buffer{}, buffer_of(gc),
                                      g_old.has_value() ? buffer_of(oc) : Buffer{},
                                      skipped ? Buffer{} : buffer_of(state), buffer_of(X),
                                      coefs_of<scalar_t>(coefficients)};
    run_chunks(pass, mn, chunks, partials);
  });
  reduce_partials(partials, chunks, sqnorm);
  if (!skipped && !state.is_same(buf)) {
    buf.copy_(state);
  }
  return {X.scalar_type() == x_dtype ? X : X.to(x_dtype), sqnorm};
}

// -- the same from U diag(S) Vᵀ ------------------------------------------------------------------

void check_factors(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V, const at::Tensor& g,
                   const char* op) {
  check_matrix(g, op, "g");
  check_float(S, op, "S");
  TORCH_CHECK(S.dim() == g.dim() - 1, "limuon::", op, ": S must have shape (..., r) with the leading dims of g ",
              g.sizes(), ", got ", S.sizes());
  c10::DimVector shape(g.sizes().begin(), g.sizes().end() - 2);
  shape.push_back(S.size(-1));
  check_shape(S, shape, op, "S", "g", g);
  shape.back() = g.size(-2);
  shape.push_back(S.size(-1));
  check_shape(U, shape, op, "U", "g", g);
  shape[shape.size() - 2] = g.size(-1);
  check_shape(V, shape, op, "V", "g", g);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_momentum_ns_input_cpu(
    const at::Tensor& U, const at::Tensor& S, const at::Tensor& V, const at::Tensor& g,
    const std::optional<at::Tensor>& g_old, at::ArrayRef<double> coefficients, at::ScalarType x_dtype) {
  constexpr const char* op = "lowrank_momentum_ns_input";
  check_factors(U, S, V, g, op);
  if (g_old.has_value()) {
    check_same_shape(*g_old, g, op, "g_old", "g");
  }
  check_coefficients(coefficients, op);
  const bool use_prev = coefficients[0] != 0.0;
  const bool factor_double = is_double(U) || is_double(S) || is_double(V);  // the product's dtype
  const bool any_double = is_double(g) || (g_old.has_value() && is_double(*g_old)) || (use_prev && factor_double);
  const bool all_double = is_double(g) && (!g_old.has_value() || is_double(*g_old)) && (!use_prev || factor_double);
  if (any_double && !all_double) {
    std::optional<at::Tensor> prev;
    if (use_prev) {
      prev = at::matmul(acc(U) * acc(S).unsqueeze(-2), acc(V).mT());
    }
    auto [nw, X] = momentum_aten(prev, g, g_old, coefficients);
    return {nw.to(g.scalar_type()).contiguous(), X.to(x_dtype).contiguous(), sqnorm_aten(X)};
  }
  const at::ScalarType ct = any_double ? at::kDouble : at::kFloat;
  const int64_t m = g.size(-2), n = g.size(-1), r = S.size(-1), batch = g.numel() / (m * n);
  // S folded into U (m·r multiplies), in the reference's order (U·S) Vᵀ
  at::Tensor US, Vc;
  if (use_prev) {
    US = (U.to(ct).reshape({batch, m, r}) * S.to(ct).reshape({batch, 1, r})).contiguous();
    Vc = V.to(ct).reshape({batch, n, r}).contiguous();
  }
  const at::Tensor gc = g.contiguous();
  const at::Tensor oc = g_old.has_value() ? g_old->contiguous() : at::Tensor();
  at::Tensor nw = at::empty(g.sizes(), g.options().dtype(working_dtype(g.scalar_type(), ct)));
  at::Tensor X, sqnorm;  // (not a structured binding: C++17 lambdas cannot capture one)
  std::tie(X, sqnorm) = new_outputs(g, x_dtype, ct);
  const int64_t blocks = (m + kBlockRows - 1) / kBlockRows;
  std::vector<double> partials(batch * blocks);
  AT_DISPATCH_FLOATING_TYPES(ct, "limuon::lowrank_momentum_ns_input", [&] {
    const MomentumPass<scalar_t> pass{Buffer{}, buffer_of(gc), g_old.has_value() ? buffer_of(oc) : Buffer{},
                                      buffer_of(nw), buffer_of(X), coefs_of<scalar_t>(coefficients)};
    const int64_t grain = std::max<int64_t>(1, kGrainSize / (kBlockRows * n));
    at::parallel_for(0, batch * blocks, grain, [&](int64_t begin, int64_t end) {
      // One block of rows of the product per thread at a time (the mm runs on this thread: ATen does
      // not nest parallel regions), reused for all of its blocks.
      at::Tensor P = use_prev ? at::empty({std::min(kBlockRows, m), n}, gc.options().dtype(ct)) : at::Tensor();
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / blocks, row0 = (t % blocks) * kBlockRows, rows = std::min(kBlockRows, m - row0);
        const scalar_t* prev = nullptr;
        if (use_prev) {
          at::Tensor Pb = P.narrow(0, 0, rows);
          at::mm_out(Pb, US.select(0, b).narrow(0, row0, rows), Vc.select(0, b).t());
          prev = Pb.const_data_ptr<scalar_t>();
        }
        partials[t] = pass.run((b * m + row0) * n, rows * n, prev);
      }
    });
  });
  reduce_partials(partials, blocks, sqnorm);
  return {nw.scalar_type() == g.scalar_type() ? nw : nw.to(g.scalar_type()),
          X.scalar_type() == x_dtype ? X : X.to(x_dtype), sqnorm};
}

}  // namespace
}  // namespace limuon

TORCH_LIBRARY_IMPL(limuon, CPU, m) {
  m.impl("momentum_ns_input_", &limuon::momentum_ns_input_cpu);
  m.impl("lowrank_momentum_ns_input", &limuon::lowrank_momentum_ns_input_cpu);
}
