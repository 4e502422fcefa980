"""limuon: the LiMuon and Muon optimizers, torch.optim style, on the limuon-kernels ops.

    >>> opt = limuon.LiMuon(model.parameters(), lr=0.02, variance_reduction="approx")
"""

from limuon._common import NonFiniteGradientError
from limuon.limuon import LiMuon
from limuon.muon import Muon

__version__ = "0.1.0"
__all__ = ["LiMuon", "Muon", "NonFiniteGradientError"]
