"""limuon: the LiMuon and Muon optimizers, torch.optim style, on the limuon-kernels ops.

    >>> opt = limuon.LiMuon(limuon.param_groups(model), lr=0.02, adamw_lr=3e-4)
"""

from limuon._gradients import NonFiniteGradientError
from limuon._param_groups import explain_param_groups, param_groups
from limuon.limuon import LiMuon
from limuon.muon import Muon

__version__ = "0.1.0"
__all__ = ["LiMuon", "Muon", "NonFiniteGradientError", "explain_param_groups", "param_groups"]
