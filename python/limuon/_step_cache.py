"""Device tensors a step reuses instead of building them from host values every step: the learning rate,
the RSVD seed keys of a bucket's matrices, index lists, the non-finite flag. Not optimizer state (torch's
pickling of an optimizer drops it; it is rebuilt on the next step). Reusing them means a steady-state
step copies nothing from the host, and a captured CUDA graph keeps valid addresses."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from limuon_kernels.seeds import seed_key


class StepCache:
    def __init__(self) -> None:
        self.flags: dict[Any, Tensor] = {}  # (name, device): StepGuard's flags
        self._lr: dict[tuple, tuple[Any, Tensor]] = {}
        self._tensors: dict[tuple, Tensor] = {}

    def allocate_flags(self, devices: Any) -> Tensor:
        """The non-finite flags of StepGuard (``found``, ``one``) on each of ``devices``, and the skipped-steps
        counter (on the first device ever given; returned). Allocated outside a compiled step when possible."""
        for device in devices:
            for name, value in (("found", 0.0), ("one", 1.0)):
                key = (name, str(device))
                if key not in self.flags:
                    self.flags[key] = torch.full((), value, dtype=torch.float32, device=device)
            if "skipped" not in self.flags:
                self.flags["skipped"] = torch.zeros((), dtype=torch.float32, device=device)
        counter = self.flags.get("skipped")
        return counter if counter is not None else torch.zeros(())

    def lr(self, group: dict, device: torch.device) -> Tensor:
        """The group's lr as a 0-d fp32 tensor on ``device``, refilled on the device when the value changed
        (a scheduler's new lr costs one fill, no copy and no recompile). A tensor lr is used as it is."""
        value = group["lr"]
        if isinstance(value, Tensor):
            return value.to(device=device, dtype=torch.float32)
        key = (id(group), str(device))
        held = self._lr.get(key)
        if held is None or held[0] != value:
            t = held[1] if held is not None else torch.empty((), dtype=torch.float32, device=device)
            t.fill_(float(value))
            self._lr[key] = held = (value, t)
        return held[1]

    def forget_lr(self) -> None:
        """Drop the lr tensors (the param groups were replaced, by ``load_state_dict``)."""
        self._lr.clear()

    def index(self, positions: tuple[int, ...], device: torch.device) -> Tensor:
        """``positions`` as an int64 tensor on ``device`` (built once)."""
        return self._cached(("index", positions, str(device)),
                            lambda: torch.tensor(positions, dtype=torch.long, device=device))

    def seed_keys(self, seed: int, keys: tuple[tuple[int, ...], ...], device: torch.device) -> Tensor:
        """Per matrix, ``seeds.seed_key(seed, *k)`` for each ``k`` of ``keys`` (parameter index, then the matrix
        of a stacked parameter), as an int64 tensor on ``device``: the kernels finish each seed with the step."""
        return self._cached(("seeds", seed, keys, str(device)),
                            lambda: torch.tensor([seed_key(seed, *k) for k in keys], dtype=torch.int64,
                                                 device=device))

    def _cached(self, key: tuple, make: Any) -> Tensor:
        t = self._tensors.get(key)
        if t is None:
            if len(self._tensors) > 4096:  # (bounded: parameter sets that keep changing)
                self._tensors.clear()
            t = self._tensors[key] = make()
        return t
