"""limuon-kernels: fused kernels behind the LiMuon and Muon optimizers.

Public kernel API (stable):
    newton_schulz(G, steps=5, coefficients="keller", eps=1e-7, compute_dtype=None, method="auto")
    rsvd(M, rank, oversample=5, power_iters=0, seed=0) -> (U, S, V)
    storm_update_(m, g_new, g_old, momentum)
    lowrank_storm(U, S, V, g_new, g_old, momentum)
the fused step ops ``momentum_ns_input_``, ``lowrank_momentum_ns_input``, ``newton_schulz_update_``
and ``rsvd_update_`` (fused_ops.py), plus ``mars_update_``, ``lowrank_axpby``, ``orthogonalize_svd`` and
``resolve_ns_method`` (which Newton–Schulz form ``method="auto"`` picks), and the backend controls
``set_backend``, ``get_backend``, ``available_backends`` (``HAS_C_EXT`` says whether the compiled
C++ kernels loaded), and the Newton–Schulz matmul dtype per device: ``get_ns_compute_dtype``,
``set_ns_compute_dtype``, ``ns_compute_dtype_reason``.
"""

from limuon_kernels import ops, fused_ops  # noqa: F401, I001  (defines the op schemas before _C registers kernels)
from limuon_kernels import _extension

_extension.load()

from limuon_kernels.backend import available_backends, get_backend, set_backend  # noqa: E402
from limuon_kernels.fused_ops import (  # noqa: E402
    lowrank_momentum_ns_input,
    momentum_ns_input_,
    newton_schulz_update_,
    rsvd_update_,
)
from limuon_kernels.ns_method import NS_METHODS, resolve_ns_method  # noqa: E402
from limuon_kernels.ops import (  # noqa: E402
    derive_seed,
    get_ns_compute_dtype,
    lowrank_axpby,
    lowrank_storm,
    mars_update_,
    newton_schulz,
    ns_compute_dtype_reason,
    orthogonalize_svd,
    rsvd,
    set_ns_compute_dtype,
    storm_update_,
)

HAS_C_EXT: bool = _extension.HAS_C_EXT
__version__ = "0.1.0"

__all__ = [
    "HAS_C_EXT",
    "NS_METHODS",
    "available_backends",
    "derive_seed",
    "get_backend",
    "get_ns_compute_dtype",
    "lowrank_axpby",
    "lowrank_momentum_ns_input",
    "lowrank_storm",
    "mars_update_",
    "momentum_ns_input_",
    "newton_schulz",
    "newton_schulz_update_",
    "ns_compute_dtype_reason",
    "orthogonalize_svd",
    "resolve_ns_method",
    "rsvd",
    "rsvd_update_",
    "set_backend",
    "set_ns_compute_dtype",
    "storm_update_",
]
