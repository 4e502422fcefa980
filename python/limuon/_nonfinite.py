"""Non-finite gradients, found on the device: one flag per step that every kernel of the step reads.

``found`` (a 0-d fp32 tensor, 1.0 when any gradient of the step holds NaN or Inf) is computed by torch's
GradScaler primitive ``_amp_foreach_non_finite_check_and_unscale_`` (one launch per device and dtype; the
"unscale" multiplies by 1.0, which changes no value). The fused kernels take it as ``skip`` and write
nothing when it is set; step counters advance by ``ok = 1 − found``; torch's fused AdamW takes it as
``found_inf``. With ``nonfinite="skip"`` the step never reads it back (GradScaler's behaviour: the step
is skipped on the device and counted in ``skipped_steps``); with ``"raise"`` it is read once (``settle``),
and a set flag raises ``NonFiniteGradientError`` with parameters and state as they were.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from limuon._distributed import local
from limuon._gradients import NonFiniteGradientError
from limuon._step_cache import StepCache

NONFINITE_MODES = ("raise", "skip")


class StepGuard:
    """The non-finite flag of one step, on the device of the first gradient (``device``).

    Tensors are cached per device in ``cache`` (the optimizer's ``StepCache``), so a steady-state step allocates nothing
    and a CUDA graph sees the same addresses every replay."""

    def __init__(self, cache: StepCache, checked: list[tuple[str, list]], process_group: Any = None) -> None:
        """``checked``: (what, [(param index, param, gradient or None)]) pairs: the gradients of the step."""
        self._cache = cache
        self.checked = checked
        grads = [g for _, items in checked for _, _, g in items if g is not None]
        self.device = local(grads[0]).device if grads else torch.device("cpu")
        self.found = self._tensor("found", self.device, 0.0)
        self.found.zero_()
        by_kind: dict[tuple, list[Tensor]] = {}
        for g in grads:
            held = local(g)
            if any(st == 0 and d > 1 for st, d in zip(held.stride(), held.shape)):
                # (an expanded gradient: the GradScaler op writes its input, so check this one by reading)
                bad = torch.isfinite(held).logical_not().any().to(torch.float32).to(self.device)
                self.found.copy_(torch.maximum(self.found, bad))
                continue
            by_kind.setdefault((held.device, held.dtype), []).append(held)
        for (device, _), held in by_kind.items():
            found = self.found if device == self.device else self._tensor("found", device, 0.0)
            if found is not self.found:
                found.zero_()
            torch._amp_foreach_non_finite_check_and_unscale_(held, found, self._tensor("one", device, 1.0))
            if found is not self.found:
                self.found.add_(found.to(self.device)).clamp_(max=1.0)
        if process_group is not None:  # (every rank skips, or none does; on the device, no read)
            dist.all_reduce(self.found, op=dist.ReduceOp.MAX, group=process_group)
        self.ok = torch.rsub(self.found, 1.0)
        self.settled = False

    def _tensor(self, name: str, device: torch.device, value: float) -> Tensor:
        """The cached flag ``name`` ("found" or "one") on ``device`` (``value``: what it was allocated with)."""
        self._cache.allocate_flags([device])
        return self._cache.flags[(name, str(device))]

    def found_on(self, device: torch.device) -> Tensor:
        """The flag on ``device`` (a copy per step when it is not the main device)."""
        return self.found if device == self.device else self.found.to(device)

    def ok_on(self, device: torch.device) -> Tensor:
        return self.ok if device == self.device else self.ok.to(device)

    def settle(self, message: Any) -> None:
        """``"raise"`` mode: read the flag (the step's one host read; later calls do nothing) and raise
        ``NonFiniteGradientError(message())`` when it is set."""
        if self.settled:
            return
        self.settled = True
        if bool(self.found.item()):
            raise NonFiniteGradientError(message())
