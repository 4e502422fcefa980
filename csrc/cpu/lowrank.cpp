// Low-rank STORM and axpby (limuon::lowrank_storm, limuon::lowrank_axpby).
//
// Both read a dense gradient and a rank-r product U diag(S) Vᵀ. The product is never materialised:
// each task computes one block of its rows into a buffer that stays in cache and applies the
// elementwise epilogue while the block is hot, so the dense traffic is one read of each gradient and
// one write of the output, as for a plain elementwise op.
#include "common.h"

#include <torch/library.h>

#include <algorithm>

namespace limuon {
namespace {

// 64 rows × n fp32 is 192 KiB for n = 768 (GPT-2 small): it stays in L2, and B·⌈m/64⌉ blocks keep
// both threads busy down to m = 128.
constexpr int64_t kBlockRows = 64;

// U diag(S) (batch, m, r) and V (batch, n, r), contiguous in the op's compute dtype.
struct Factors {
  at::Tensor US;
  at::Tensor V;
  int64_t batch, m, n;
};

Factors prepare(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V, const at::Tensor& g,
                at::ScalarType ct, const char* op, const char* g_name) {
  check_matrix(g, op, g_name);
  check_float(S, op, "S");
  TORCH_CHECK(S.dim() == g.dim() - 1, "limuon::", op, ": S must have shape (..., r) with the leading dims of ",
              g_name, " ", g.sizes(), ", got ", S.sizes());
  const int64_t m = g.size(-2), n = g.size(-1), r = S.size(-1);
  c10::DimVector shape(g.sizes().begin(), g.sizes().end() - 2);
  shape.push_back(r);
  check_shape(S, shape, op, "S", g_name, g);
  shape.back() = m;
  shape.push_back(r);
  check_shape(U, shape, op, "U", g_name, g);
  shape[shape.size() - 2] = n;
  check_shape(V, shape, op, "V", g_name, g);

  const int64_t batch = g.numel() / (m * n);
  // S is folded into U (m·r multiplies, not m·n), in the order the reference uses: (U·S) Vᵀ.
  at::Tensor US = (U.to(ct).reshape({batch, m, r}) * S.to(ct).reshape({batch, 1, r})).contiguous();
  return {std::move(US), V.to(ct).reshape({batch, n, r}).contiguous(), batch, m, n};
}

// Calls epilogue(offset, count, P) once per block of rows, where P holds `count` contiguous elements of
// U diag(S) Vᵀ that belong at flat offset `offset` of the contiguous (batch, m, n) output.
template <typename opmath_t, typename Epilogue>
void for_each_block(const Factors& f, const Epilogue& epilogue) {
  const int64_t blocks = (f.m + kBlockRows - 1) / kBlockRows;
  const int64_t grain = std::max<int64_t>(1, kGrainSize / (kBlockRows * f.n));
  at::parallel_for(0, f.batch * blocks, grain, [&](int64_t begin, int64_t end) {
    // Each block's mm runs on the calling thread (ATen does not nest parallel regions): the
    // parallelism is over blocks, and the buffer is this thread's for all of its blocks.
    at::Tensor buf = at::empty({std::min(kBlockRows, f.m), f.n}, f.US.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / blocks;
      const int64_t row0 = (t % blocks) * kBlockRows;
      const int64_t rows = std::min(kBlockRows, f.m - row0);
      at::Tensor P = buf.narrow(0, 0, rows);
      at::mm_out(P, f.US.select(0, b).narrow(0, row0, rows), f.V.select(0, b).t());
      epilogue((b * f.m + row0) * f.n, rows * f.n, P.const_data_ptr<opmath_t>());
    }
  });
}

// The epilogues below spell out their vector loop rather than share a generic one taking a lambda:
// at::vec's portable build relies on the compiler to vectorise, and it left that generic loop scalar.

// out = g_new + μ(P − g_old) over one block of count elements.
template <typename scalar_t, typename old_t>
void storm_block(const at::opmath_type<scalar_t>* p, const scalar_t* g_new, const old_t* g_old,
                 scalar_t* out, int64_t count, at::opmath_type<scalar_t> mu) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = typename Lanes<scalar_t>::Vec;
  constexpr int64_t kStep = Lanes<scalar_t>::kStep;
  const Vec mu_v(mu);
  int64_t i = 0;
  for (; i + kStep <= count; i += kStep) {
    Vec p0, p1, n0, n1, o0, o1;
    Lanes<opmath_t>::load(p + i, p0, p1);
    Lanes<scalar_t>::load(g_new + i, n0, n1);
    Lanes<old_t>::load(g_old + i, o0, o1);
    Lanes<scalar_t>::store(out + i, n0 + mu_v * (p0 - o0), n1 + mu_v * (p1 - o1));
  }
  for (; i < count; ++i) {
    out[i] = static_cast<scalar_t>(static_cast<opmath_t>(g_new[i]) +
                                   mu * (p[i] - static_cast<opmath_t>(g_old[i])));
  }
}

// out = αP + βg over one block of count elements.
template <typename scalar_t>
void axpby_block(const at::opmath_type<scalar_t>* p, const scalar_t* g, scalar_t* out, int64_t count,
                 at::opmath_type<scalar_t> alpha, at::opmath_type<scalar_t> beta) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = typename Lanes<scalar_t>::Vec;
  constexpr int64_t kStep = Lanes<scalar_t>::kStep;
  const Vec alpha_v(alpha), beta_v(beta);
  int64_t i = 0;
  for (; i + kStep <= count; i += kStep) {
    Vec p0, p1, g0, g1;
    Lanes<opmath_t>::load(p + i, p0, p1);
    Lanes<scalar_t>::load(g + i, g0, g1);
    Lanes<scalar_t>::store(out + i, alpha_v * p0 + beta_v * g0, alpha_v * p1 + beta_v * g1);
  }
  for (; i < count; ++i) {
    out[i] = static_cast<scalar_t>(alpha * p[i] + beta * static_cast<opmath_t>(g[i]));
  }
}

at::Tensor lowrank_storm_cpu(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                             const at::Tensor& g_new, const at::Tensor& g_old, double momentum) {
  constexpr const char* op = "lowrank_storm";
  const at::ScalarType ct = compute_dtype({U, S, V, g_new, g_old});
  const Factors f = prepare(U, S, V, g_new, ct, op, "g_new");
  check_same_shape(g_old, g_new, op, "g_old", "g_new");
  const at::ScalarType work = working_dtype(g_new.scalar_type(), ct);
  const at::ScalarType old_dtype = operand_dtype(work, {g_old});
  const at::Tensor gn = contiguous_as(g_new, work);
  const at::Tensor go = contiguous_as(g_old, old_dtype);
  at::Tensor out = at::empty(g_new.sizes(), g_new.options().dtype(work));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, work, "limuon::lowrank_storm", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t mu = static_cast<opmath_t>(momentum);
    const scalar_t* gn_p = gn.const_data_ptr<scalar_t>();
    scalar_t* out_p = out.data_ptr<scalar_t>();
    auto run = [&](const auto* go_p) {
      for_each_block<opmath_t>(f, [&](int64_t off, int64_t count, const opmath_t* p) {
        storm_block(p, gn_p + off, go_p + off, out_p + off, count, mu);
      });
    };
    if (old_dtype == work) {
      run(go.const_data_ptr<scalar_t>());
    } else {
      run(go.const_data_ptr<opmath_t>());
    }
  });
  return out.scalar_type() == g_new.scalar_type() ? out : out.to(g_new.scalar_type());
}

at::Tensor lowrank_axpby_cpu(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                             const at::Tensor& g, double alpha, double beta) {
  const at::ScalarType ct = compute_dtype({U, S, V, g});
  const Factors f = prepare(U, S, V, g, ct, "lowrank_axpby", "g");
  const at::ScalarType work = working_dtype(g.scalar_type(), ct);
  const at::Tensor gc = contiguous_as(g, work);
  at::Tensor out = at::empty(g.sizes(), g.options().dtype(work));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, work, "limuon::lowrank_axpby", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t a = static_cast<opmath_t>(alpha), b = static_cast<opmath_t>(beta);
    const scalar_t* g_p = gc.const_data_ptr<scalar_t>();
    scalar_t* out_p = out.data_ptr<scalar_t>();
    for_each_block<opmath_t>(f, [&](int64_t off, int64_t count, const opmath_t* p) {
      axpby_block(p, g_p + off, out_p + off, count, a, b);
    });
  });
  return out.scalar_type() == g.scalar_type() ? out : out.to(g.scalar_type());
}

}  // namespace
}  // namespace limuon

TORCH_LIBRARY_IMPL(limuon, CPU, m) {
  m.impl("lowrank_storm", &limuon::lowrank_storm_cpu);
  m.impl("lowrank_axpby", &limuon::lowrank_axpby_cpu);
}
