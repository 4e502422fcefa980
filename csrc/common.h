// Shared argument checks and vector load/store helpers of the limuon:: CPU kernels.
//
// The Python wrappers in limuon_kernels/ops.py validate arguments before dispatch, but the kernels are
// also reachable directly through torch.ops.limuon.*, so each one re-checks what it relies on. Every
// message starts with the op name and names the offending argument.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/bit_cast.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace limuon {

// Same as ATen's at::internal::GRAIN_SIZE: below this many elements a thread hand-off costs more
// than the work it would take over.
constexpr int64_t kGrainSize = 32768;

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "limuon::", op, ": ", name,
              " must be a CPU tensor for the C++ kernel, got a tensor on ", t.device());
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  check_cpu(t, op, name);
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "limuon::", op, ": ", name, " must be a float32, float64, bfloat16 or float16 tensor, got ",
              dt);
}

inline void check_matrix(const at::Tensor& t, const char* op, const char* name) {
  check_float(t, op, name);
  TORCH_CHECK(t.dim() >= 2, "limuon::", op, ": ", name, " must have shape (..., m, n), got ",
              t.sizes());
  TORCH_CHECK(t.numel() > 0, "limuon::", op, ": ", name, " must not be empty, got shape ", t.sizes());
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* op,
                             const char* name, const char* ref_name) {
  check_float(t, op, name);
  TORCH_CHECK(t.sizes() == ref.sizes(), "limuon::", op, ": ", name, " must have the shape of ",
              ref_name, " ", ref.sizes(), ", got ", t.sizes());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op,
                        const char* name, const char* ref_name, const at::Tensor& ref) {
  check_float(t, op, name);
  TORCH_CHECK(t.sizes() == expected, "limuon::", op, ": ", name, " must have shape ", expected,
              " to match ", ref_name, " ", ref.sizes(), ", got ", t.sizes());
}

// The arithmetic dtype of a storage dtype: fp32 for fp32/bf16/fp16, fp64 for fp64.
inline at::ScalarType opmath_dtype(at::ScalarType dt) {
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

// The dtype an op computes in: fp64 when any operand is fp64, else fp32. This is what the reference
// gets by upcasting every operand to at least fp32 and letting type promotion combine them.
inline at::ScalarType compute_dtype(std::initializer_list<at::Tensor> operands) {
  for (const auto& t : operands) {
    if (t.scalar_type() == at::kDouble) {
      return at::kDouble;
    }
  }
  return at::kFloat;
}

// The dtype a kernel's main tensor (the state it updates, or its output) is processed in: its own,
// unless an fp64 operand makes the op compute in fp64 while it is narrower; then the kernel works on an
// fp64 copy that is rounded once at the end, as the reference rounds once when it stores.
inline at::ScalarType working_dtype(at::ScalarType storage, at::ScalarType compute) {
  return opmath_dtype(storage) == compute ? storage : compute;
}

// The dtype a kernel reads its other operands in: the working dtype when they all share it, else its
// compute dtype. Never the narrower storage dtype: an fp32 gradient rounded to a bf16 state's dtype
// before the arithmetic would lose what the reference keeps.
inline at::ScalarType operand_dtype(at::ScalarType working, std::initializer_list<at::Tensor> operands) {
  for (const auto& t : operands) {
    if (t.scalar_type() != working) {
      return opmath_dtype(working);
    }
  }
  return working;
}

// t itself when it already is contiguous in dtype, else one contiguous copy in dtype. (Not
// t.to(dtype, ..., MemoryFormat::Contiguous): with dtype unchanged that returns a transposed matrix
// as it is, since its suggested memory format is already "contiguous".)
inline at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) {
    return t.contiguous();
  }
  at::Tensor out = at::empty(t.sizes(), t.options().dtype(dtype));
  out.copy_(t);
  return out;
}

// bf16 <-> fp32 by bit manipulation, in fixed-length loops the compiler vectorises at the baseline ISA.
// ATen's converters are intrinsics only in AVX2/AVX512 builds (setup.py makes one where the machine
// allows); a portable build gets their element-by-element fallback, which made the bf16 updates 5-10x
// slower than the fp32 ones. Rounding is to nearest even and NaN becomes the canonical quiet NaN: the
// same bits as c10::BFloat16(float).
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
constexpr bool kPortableBFloat16 = false;
#else
constexpr bool kPortableBFloat16 = true;
#endif

inline void bf16_to_float(const c10::BFloat16* src, float* dst, int64_t count) {
  const auto* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t k = 0; k < count; ++k) {
    dst[k] = c10::bit_cast<float>(static_cast<uint32_t>(bits[k]) << 16);
  }
}

inline void float_to_bf16(const float* src, c10::BFloat16* dst, int64_t count) {
  auto* bits = reinterpret_cast<uint16_t*>(dst);
  for (int64_t k = 0; k < count; ++k) {
    const uint32_t u = c10::bit_cast<uint32_t>(src[k]);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    bits[k] = static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
  }
}

// Loads and stores kStep elements of T as two vectors of its compute type (fp32 for the half types,
// upcast on load and rounded to nearest even on store). Two vectors per step for every T, so that a
// bf16 operand and an fp32 operand of the same kernel advance in lockstep.
template <typename T>
struct Lanes {
  using opmath_t = at::opmath_type<T>;
  using Vec = at::vec::Vectorized<opmath_t>;
  static constexpr int64_t kWidth = Vec::size();
  static constexpr int64_t kStep = 2 * kWidth;

  // One vector: the first kWidth elements at p.
  static Vec load1(const T* p) {
    if constexpr (kPortableBFloat16 && std::is_same_v<T, c10::BFloat16>) {
      __at_align__ float buf[kWidth];
      bf16_to_float(p, buf, kWidth);
      return Vec::loadu(buf);
    } else if constexpr (c10::is_reduced_floating_point_v<T>) {
      Vec v;
      at::vec::load_to_float<T>(p, v);
      return v;
    } else {
      return Vec::loadu(p);
    }
  }

  static void load(const T* p, Vec& lo, Vec& hi) {
    lo = load1(p);
    hi = load1(p + kWidth);
  }

  static void store(T* p, const Vec& lo, const Vec& hi) {
    if constexpr (kPortableBFloat16 && std::is_same_v<T, c10::BFloat16>) {
      __at_align__ float buf[kStep];
      lo.store(buf);
      hi.store(buf + kWidth);
      float_to_bf16(buf, p, kStep);
    } else if constexpr (c10::is_reduced_floating_point_v<T>) {
      at::vec::convert_from_float<T>(lo, hi).store(p);
    } else {
      lo.store(p);
      hi.store(p + kWidth);
    }
  }
};

// -- tiles staged in the compute type (csrc/cpu/fused_momentum.cpp, fused_ns_update.cpp) ----------
// A kernel that reads operands of several storage dtypes works on tiles of their compute type
// opmath_t: fp32/fp64 storage is used in place, bf16/fp16 is converted into a small buffer on the way in
// and rounded (to nearest even) once on the way out.

// A contiguous tensor's storage, read and written in tiles of its compute type.
struct Buffer {
  void* ptr = nullptr;  // null: absent
  at::ScalarType dtype = at::kFloat;
};

inline Buffer buffer_of(const at::Tensor& t) { return {t.data_ptr(), t.scalar_type()}; }

template <typename T, typename opmath_t>
void load_as(const T* src, opmath_t* dst, int64_t count) {
  using L = Lanes<T>;
  int64_t i = 0;
  for (; i + L::kStep <= count; i += L::kStep) {
    typename L::Vec lo, hi;
    L::load(src + i, lo, hi);
    lo.store(dst + i);
    hi.store(dst + i + L::kWidth);
  }
  for (; i < count; ++i) {
    dst[i] = static_cast<opmath_t>(src[i]);
  }
}

template <typename T, typename opmath_t>
void store_as(const opmath_t* src, T* dst, int64_t count) {
  using L = Lanes<T>;
  int64_t i = 0;
  for (; i + L::kStep <= count; i += L::kStep) {
    L::store(dst + i, L::Vec::loadu(src + i), L::Vec::loadu(src + i + L::kWidth));
  }
  for (; i < count; ++i) {
    dst[i] = static_cast<T>(src[i]);
  }
}

template <typename opmath_t>
bool holds(const Buffer& b) {
  return b.dtype == c10::CppTypeToScalarType<opmath_t>::value;
}

// Elements [off, off + count) of b as opmath_t: b itself when it holds opmath_t, else converted into tmp.
template <typename opmath_t>
const opmath_t* read_tile(const Buffer& b, int64_t off, int64_t count, opmath_t* tmp) {
  if (holds<opmath_t>(b)) {
    return static_cast<const opmath_t*>(b.ptr) + off;
  }
  if constexpr (std::is_same_v<opmath_t, float>) {
    if (b.dtype == at::kBFloat16) {
      load_as(static_cast<const c10::BFloat16*>(b.ptr) + off, tmp, count);
      return tmp;
    }
    if (b.dtype == at::kHalf) {
      load_as(static_cast<const c10::Half*>(b.ptr) + off, tmp, count);
      return tmp;
    }
  }
  TORCH_INTERNAL_ASSERT(false, "limuon: no ", b.dtype, " operand in a ", c10::CppTypeToScalarType<opmath_t>::value,
                        " kernel");
  return nullptr;
}

// Where to compute the tile of b at off: in b when it holds opmath_t, else in tmp (then write_tile).
template <typename opmath_t>
opmath_t* out_tile(const Buffer& b, int64_t off, opmath_t* tmp) {
  return holds<opmath_t>(b) ? static_cast<opmath_t*>(b.ptr) + off : tmp;
}

template <typename opmath_t>
void write_tile(const Buffer& b, int64_t off, int64_t count, const opmath_t* tile) {
  if (holds<opmath_t>(b)) {
    return;  // computed in place
  }
  if constexpr (std::is_same_v<opmath_t, float>) {
    if (b.dtype == at::kBFloat16) {
      return store_as(tile, static_cast<c10::BFloat16*>(b.ptr) + off, count);
    }
    if (b.dtype == at::kHalf) {
      return store_as(tile, static_cast<c10::Half*>(b.ptr) + off, count);
    }
  }
  TORCH_INTERNAL_ASSERT(false, "limuon: no ", b.dtype, " output in a ", c10::CppTypeToScalarType<opmath_t>::value,
                        " kernel");
}

// The Newton–Schulz iterations on a normalised X (B, p, q), p ≤ q, in X's dtype (csrc/cpu/newton_schulz.cpp),
// shared by limuon::newton_schulz / gram_newton_schulz and the fused limuon::newton_schulz_update_.
// gram_ns_iterate checks `restarts` and names `op` in its error.
at::Tensor ns_iterate(at::Tensor X, at::ArrayRef<double> coefficients);
at::Tensor gram_ns_iterate(at::Tensor X, at::ArrayRef<double> coefficients, at::IntArrayRef restarts,
                           const char* op);

}  // namespace limuon
