"""Every ``limuon::`` op: schema, fake (meta) implementation, reference registration, public wrapper.

One op, three implementations (docs/DESIGN.md §2):
  * the reference kernel (``reference.py``), registered here as ``CompositeExplicitAutograd`` so
    it serves every device that has no dedicated kernel;
  * the C++ CPU kernel, registered by ``limuon_kernels._C`` with ``TORCH_LIBRARY_IMPL(limuon, CPU)``;
  * the Triton kernel for CUDA tensors (``limuon_kernels/triton/``).

The public wrappers validate their arguments (errors name the argument and the problem), then pick
the implementation with ``backend.resolve(device)``: ``"torch"`` calls the reference directly,
``"cpp"`` goes through the dispatcher to the C++ kernel.
"""

from __future__ import annotations

import importlib
import operator
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from limuon_kernels import backend, cpu_features, reference, reference_fused
from limuon_kernels.ns_coefficients import Coefficients, resolve_coefficients
from limuon_kernels.ns_method import gram_restarts, resolve_ns_method
from limuon_kernels.seeds import derive_seed

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

torch.library.define(
    "limuon::newton_schulz",
    "(Tensor G, float[] coefficients, float eps, float norm_scale, ScalarType? compute_dtype) -> Tensor",
)
torch.library.define(
    "limuon::gram_newton_schulz",
    "(Tensor G, float[] coefficients, float eps, float norm_scale, ScalarType? compute_dtype, int[] restarts)"
    " -> Tensor",
)
torch.library.define(
    "limuon::rsvd",
    "(Tensor M, int rank, int oversample, int power_iters, int[] seeds) -> (Tensor U, Tensor S, Tensor V)",
)
torch.library.define(
    "limuon::storm_update_", "(Tensor(a!) m, Tensor g_new, Tensor g_old, float momentum) -> ()"
)
torch.library.define("limuon::mars_update_", "(Tensor(a!) b, Tensor g, float momentum, float gamma) -> Tensor")
torch.library.define(
    "limuon::lowrank_storm",
    "(Tensor U, Tensor S, Tensor V, Tensor g_new, Tensor g_old, float momentum) -> Tensor",
)
torch.library.define(
    "limuon::lowrank_axpby", "(Tensor U, Tensor S, Tensor V, Tensor g, float alpha, float beta) -> Tensor"
)

torch.library.define("limuon::gaussian_sketch", "(int n, int k, int seed, Device device) -> Tensor")

_OPS = (
    "gaussian_sketch",
    "newton_schulz",
    "gram_newton_schulz",
    "rsvd",
    "storm_update_",
    "mars_update_",
    "lowrank_storm",
    "lowrank_axpby",
)
for _name in _OPS:
    torch.library.impl(f"limuon::{_name}", "CompositeExplicitAutograd")(getattr(reference, _name))


@torch.library.register_fake("limuon::newton_schulz")
def _newton_schulz_fake(G, coefficients, eps, norm_scale, compute_dtype):
    return torch.empty_like(G, memory_format=torch.contiguous_format)


@torch.library.register_fake("limuon::gram_newton_schulz")
def _gram_newton_schulz_fake(G, coefficients, eps, norm_scale, compute_dtype, restarts):
    return torch.empty_like(G, memory_format=torch.contiguous_format)


@torch.library.register_fake("limuon::gaussian_sketch")
def _gaussian_sketch_fake(n, k, seed, device):
    return torch.empty((n, k), dtype=torch.float32, device=device)


@torch.library.register_fake("limuon::rsvd")
def _rsvd_fake(M, rank, oversample, power_iters, seeds):
    *lead, m, n = M.shape
    f32 = torch.float32
    return (
        M.new_empty((*lead, m, rank), dtype=f32),
        M.new_empty((*lead, rank), dtype=f32),
        M.new_empty((*lead, n, rank), dtype=f32),
    )


@torch.library.register_fake("limuon::storm_update_")
def _storm_update_fake(m, g_new, g_old, momentum):
    return None


@torch.library.register_fake("limuon::mars_update_")
def _mars_update_fake(b, g, momentum, gamma):
    return torch.empty_like(g, memory_format=torch.contiguous_format)


@torch.library.register_fake("limuon::lowrank_storm")
def _lowrank_storm_fake(U, S, V, g_new, g_old, momentum):
    return torch.empty_like(g_new, memory_format=torch.contiguous_format)


@torch.library.register_fake("limuon::lowrank_axpby")
def _lowrank_axpby_fake(U, S, V, g, alpha, beta):
    return torch.empty_like(g, memory_format=torch.contiguous_format)


# -- argument checks ------------------------------------------------------------------------------


# Plain `if ...: raise` with eagerly built messages: torch._check's message lambdas would close over
# tensors, which Dynamo cannot trace (every op call would become a graph break under torch.compile).


def _check_float(t: Tensor, name: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a float32, float64, bfloat16 or float16 tensor, got {t.dtype}")


def _check_matrix(t: Tensor, name: str) -> None:
    _check_float(t, name)
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (..., m, n), got {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")


def _check_same(t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    _check_float(t, name)
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def _check_lowrank(U: Tensor, S: Tensor, V: Tensor, g: Tensor, g_name: str) -> None:
    _check_matrix(g, g_name)
    *lead, m, n = g.shape
    r = S.shape[-1] if S.dim() >= 1 else -1
    for t, name, shape in ((U, "U", (*lead, m, r)), (S, "S", (*lead, r)), (V, "V", (*lead, n, r))):
        _check_float(t, name)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(
                f"{name} must have shape {tuple(shape)} to match {g_name} {tuple(g.shape)}, got {tuple(t.shape)}"
            )
        if t.device != g.device:
            raise ValueError(f"{name} must be on {g_name}'s device {g.device}, got {t.device}")


def _check_scalar(value: float, name: str, low: float | None = None, high: float | None = None) -> None:
    ok = value == value and abs(value) != float("inf")
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        bounds = [f">= {low}" if low is not None else "", f"<= {high}" if high is not None else ""]
        rng = " and ".join(b for b in bounds if b)
        raise ValueError(f"Invalid {name}: {value!r}; expected a finite number{' ' + rng if rng else ''}")


# The Triton launcher of each op lives in limuon_kernels/triton/<module>.py, with the reference's signature.
_TRITON_MODULE = {
    "newton_schulz": "newton_schulz",
    "gram_newton_schulz": "gram_newton_schulz",
    "rsvd": "rsvd",
    "storm_update_": "storm",
    "mars_update_": "storm",
    "lowrank_storm": "lowrank",
    "lowrank_axpby": "lowrank",
}


def _triton_kernel(name: str):
    # Imported on first use: importing a kernel module must not happen before TRITON_INTERPRET is
    # set (tests), and machines without triton never import it.
    module = importlib.import_module(f"limuon_kernels.triton.{_TRITON_MODULE[name]}")
    return getattr(module, name)


def _reference_kernel(name: str):
    return getattr(reference, name) if hasattr(reference, name) else getattr(reference_fused, name)


def _cuda_kernel(name: str):
    def run(*args):
        impl = _triton_kernel(name) if backend.triton_usable() else _reference_kernel(name)
        return impl(*args)

    run.__name__ = f"{name}_cuda"
    return run


def register_cuda_kernels(names: Iterable[str]) -> None:
    for name in names:
        torch.library.impl(f"limuon::{name}", "CUDA")(_cuda_kernel(name))


register_cuda_kernels(_TRITON_MODULE)


def _call(name: str, device: torch.device, *args):
    if device.type == "meta":  # the fake kernel, through the dispatcher (the reference would read values)
        return getattr(torch.ops.limuon, name)(*args)
    which = backend.resolve(device)
    if which == "torch":
        return _reference_kernel(name)(*args)
    if which == "triton" and device.type != "cuda":
        return _triton_kernel(name)(*args)  # CPU tensors under the Triton interpreter
    # Through the dispatcher: the C++ kernel for CPU tensors, the Triton kernel for CUDA tensors,
    # opaque to torch.compile either way.
    return getattr(torch.ops.limuon, name)(*args)


# -- compute dtype of Newton–Schulz per device ----------------------------------------------------

# CPU: bf16 where the CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX; there torch.optim.Muon's
# bf16 NS was 3.9–5.7× faster than ours in fp32), else fp32: emulated bf16 matmuls are 25–90× slower
# (one 768×768 NS5 took 9.4 s in bf16 and 0.10 s in fp32). Decided on first use from what torch reports
# (cpu_features.py). GPUs have bf16 tensor cores, and bf16 is what torch.optim.Muon uses.
_NS_COMPUTE_DTYPE: dict[str, torch.dtype] = {}  # the choices of set_ns_compute_dtype, per device type
_NS_COMPUTE_DTYPE_OTHER = torch.bfloat16


def set_ns_compute_dtype(device_type: str, dtype: torch.dtype) -> None:
    """Set the default matmul dtype of Newton–Schulz for ``device_type`` ("cpu", "cuda", ...)."""
    if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"Invalid Newton–Schulz compute dtype: {dtype}")
    _NS_COMPUTE_DTYPE[str(device_type)] = dtype


def get_ns_compute_dtype(device: torch.device | str) -> torch.dtype:
    """Default matmul dtype of Newton–Schulz on ``device``: what ``set_ns_compute_dtype`` set, else on CPU
    ``LIMUON_CPU_NS_DTYPE`` when set, else bf16 when it has AVX512-BF16 or AMX and fp32 otherwise; bf16
    elsewhere (``ns_compute_dtype_reason`` says why)."""
    kind = torch.device(device).type
    chosen = _NS_COMPUTE_DTYPE.get(kind)
    if chosen is not None:
        return chosen
    if kind == "cpu":
        return cpu_features.default_ns_dtype_constant()
    return _NS_COMPUTE_DTYPE_OTHER


def ns_compute_dtype_reason(device: torch.device | str) -> str:
    """Why ``get_ns_compute_dtype(device)`` is what it is, in words (``python -m limuon_kernels.info``)."""
    kind = torch.device(device).type
    if kind in _NS_COMPUTE_DTYPE:
        return f"set with set_ns_compute_dtype({kind!r}, ...)"
    if kind == "cpu":
        return cpu_features.default_ns_dtype()[1]
    return "the default off the CPU: GPU tensor cores multiply bf16, and torch.optim.Muon uses it"


# -- public API -----------------------------------------------------------------------------------


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    coefficients: Coefficients = "keller",
    eps: float = 1e-7,
    compute_dtype: torch.dtype | None = None,
    method: str = "auto",
) -> Tensor:
    """Orthogonalise every matrix of ``G: (..., m, n)`` with ``steps`` Newton–Schulz iterations.

        X ← G / max(s·‖G‖_F, eps);  repeat: A = X Xᵀ;  B = b·A + c·A²;  X ← a·X + B X
    on the side that makes ``A`` min(m, n)², where ``s`` is 1 (``"keller"``) or 1.02
    (``"polar_express"``). ``compute_dtype`` (default: ``get_ns_compute_dtype(G.device)``) is the
    matmul dtype. Returns a contiguous tensor of G's shape and dtype, ≈ U Vᵀ for G = U Σ Vᵀ.

    ``method``: ``"standard"`` (the iteration above), ``"gram"`` (the same polynomial computed on
    min(m, n)² Gram matrices, fewer flops for wide or tall G; see ``reference.gram_newton_schulz``)
    or ``"auto"`` (``resolve_ns_method``: Gram where it was measured to be faster on this device).
    """
    _check_matrix(G, "G")
    flat, scale = resolve_coefficients(coefficients, steps)
    _check_scalar(eps, "eps", low=0.0)
    if compute_dtype is not None and compute_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"Invalid compute_dtype: {compute_dtype}; expected float32, float64, bfloat16 or float16")
    dtype = compute_dtype if compute_dtype is not None else get_ns_compute_dtype(G.device)
    if resolve_ns_method(method, G.shape[-2], G.shape[-1], G.device, dtype) == "gram":
        return _call("gram_newton_schulz", G.device, G, flat, float(eps), scale, dtype, gram_restarts(steps))
    return _call("newton_schulz", G.device, G, flat, float(eps), scale, dtype)


def _is_index(x: object) -> bool:
    """An integer (Python or NumPy), not a bool."""
    if isinstance(x, bool):
        return False
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def rsvd(
    M: Tensor,
    rank: int,
    oversample: int = 5,
    power_iters: int = 0,
    seed: int | Sequence[int] = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized SVD of every matrix of ``M: (..., m, n)``: ``M ≈ U diag(S) Vᵀ`` (fp32 outputs).

    Returns ``U: (..., m, r)``, ``S: (..., r)`` (descending), ``V: (..., n, r)``. The sketch width
    is ``min(rank + oversample, m, n)``; ``power_iters`` subspace iterations sharpen the spectrum.
    ``seed`` is one int (matrix ``i`` of the batch then uses ``derive_seed(seed, i)``) or one seed
    per matrix; the result is deterministic for given seeds.
    """
    _check_matrix(M, "M")
    *lead, m, n = M.shape
    batch = 1
    for d in lead:
        batch *= d
    for value, name, low in ((rank, "rank", 1), (oversample, "oversample", 0), (power_iters, "power_iters", 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= {low}")
    if rank > min(m, n):
        raise ValueError(f"Invalid rank: {rank}; must be at most min(m, n) = {min(m, n)} for M of shape {(m, n)}")
    if _is_index(seed):
        seeds = [derive_seed(operator.index(seed), i) for i in range(batch)]
    elif isinstance(seed, Iterable) and not isinstance(seed, (str, bytes)) and all(_is_index(s) for s in seed):
        seeds = [operator.index(s) for s in seed]
        if len(seeds) != batch:
            raise ValueError(f"Invalid seed: {len(seeds)} seeds given for a batch of {batch} matrices")
    else:
        raise ValueError(f"Invalid seed: {seed!r}; expected an int or a sequence of one int per matrix")
    if any(s < 0 or s >= 1 << 63 for s in seeds):
        raise ValueError("Invalid seed: seeds must be in [0, 2**63)")
    return _call("rsvd", M.device, M, rank, oversample, power_iters, seeds)


def storm_update_(m: Tensor, g_new: Tensor, g_old: Tensor, momentum: float) -> Tensor:
    """In place, one pass: ``m ← g_new + momentum·(m − g_old)`` (LiMuon's STORM momentum). Returns m."""
    _check_float(m, "m")
    _check_same(g_new, m, "g_new", "m")
    _check_same(g_old, m, "g_old", "m")
    _check_scalar(momentum, "momentum", 0.0, 1.0)
    _call("storm_update_", m.device, m, g_new, g_old, float(momentum))
    return m


def mars_update_(b: Tensor, g: Tensor, momentum: float, gamma: float) -> Tensor:
    """One pass of the one-gradient ("approx") mode: ``b ← μb + (1−γ)(1−μ)/μ·g``; returns ``γg + μb``."""
    _check_float(b, "b")
    _check_same(g, b, "g", "b")
    _check_scalar(momentum, "momentum", 0.0, 1.0)
    if momentum == 0.0:
        raise ValueError("Invalid momentum: 0.0; the approx (MARS) update divides by momentum")
    _check_scalar(gamma, "gamma", 0.0, 1.0)
    return _call("mars_update_", b.device, b, g, float(momentum), float(gamma))


def lowrank_storm(U: Tensor, S: Tensor, V: Tensor, g_new: Tensor, g_old: Tensor, momentum: float) -> Tensor:
    """``g_new + momentum·(U diag(S) Vᵀ − g_old)`` without materialising ``U diag(S) Vᵀ``.

    ``U: (..., m, r)``, ``S: (..., r)``, ``V: (..., n, r)``, ``g_new, g_old: (..., m, n)``.
    Returns a new tensor in g_new's dtype.
    """
    _check_lowrank(U, S, V, g_new, "g_new")
    _check_same(g_old, g_new, "g_old", "g_new")
    _check_scalar(momentum, "momentum", 0.0, 1.0)
    return _call("lowrank_storm", g_new.device, U, S, V, g_new, g_old, float(momentum))


def lowrank_axpby(U: Tensor, S: Tensor, V: Tensor, g: Tensor, alpha: float, beta: float) -> Tensor:
    """``alpha·U diag(S) Vᵀ + beta·g`` without materialising ``U diag(S) Vᵀ`` (shapes as lowrank_storm)."""
    _check_lowrank(U, S, V, g, "g")
    _check_scalar(alpha, "alpha")
    _check_scalar(beta, "beta")
    return _call("lowrank_axpby", g.device, U, S, V, g, float(alpha), float(beta))


def orthogonalize_svd(G: Tensor, rtol: float = 1e-6) -> Tensor:
    """Exact polar factor ``U Vᵀ`` of every matrix of ``G: (..., m, n)``, in fp32 via SVD.

    Directions whose singular value is below ``rtol·σ_max`` are dropped (as Newton–Schulz maps
    them to ~0), so a zero matrix maps to zero. Returns G's shape and dtype.
    """
    _check_matrix(G, "G")
    U, S, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    keep = (rtol * S.amax(dim=-1, keepdim=True) < S).to(U.dtype)
    return torch.matmul(U * keep.unsqueeze(-2), Vh).to(G.dtype)
