"""The base of LiMuon and Muon: orthogonalised updates for matrices, AdamW for everything else.

Shared jobs live in their own modules: hyperparameter checks (``_checks``), gradient checks
(``_gradients``), the AdamW part (``_adamw``), buckets of same-shape matrices (``_buckets``), stacked
state (``_stacks``) and data-parallel execution (``_distributed``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

import limuon_kernels as lk
from limuon._adamw import adamw_step
from limuon._buckets import Bucket
from limuon._checks import ADAMW, check_adamw_group, check_choice, check_number, ns_dtype, ns_dtype_name
from limuon._distributed import Distribution, adapt_to_param, check_dtensor_param, local, resolve_group, wrap_like
from limuon._functional import Orthogonalizer, orthogonalizer
from limuon._gradients import NonFiniteGradientError, check_presence, nonfinite_message
from limuon._naming import describe_param
from limuon._nonfinite import NONFINITE_MODES, StepGuard
from limuon._param_groups import param_groups
from limuon._routing_checks import flattened_warning, looks_like_stacked_matrices, misrouted_by_name, misrouted_warning
from limuon._stacks import PARAM_SHAPED_STATE, StackedStateMixin, is_inner_slice
from limuon._step_cache import StepCache

__all__ = ["HybridOptimizer", "NonFiniteGradientError"]


class HybridOptimizer(StackedStateMixin, Optimizer):
    """Orthogonalised updates for matrices, AdamW for everything else, in one optimizer.

    Subclasses set ``_matrix_algorithm`` (the group ``algorithm`` name of their matrix update) and
    implement ``_check_group`` and ``step``.
    """

    _matrix_algorithm = "matrix"
    nonfinite = "raise"  # (what an optimizer unpickled from an older version without the attribute does)

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        # A model is routed by limuon.param_groups' rules, its parameters named in the groups (errors name them).
        if isinstance(params, nn.Module):
            params = param_groups(params, with_names=True)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        given = set(param_group) if isinstance(param_group, dict) else set()
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        first_index = sum(len(g["params"]) for g in self.param_groups[:-1])
        chose_view = group.get("matrix_view") is not None
        if "matrix_view" in group and not chose_view:
            group["matrix_view"] = "flatten"  # (None, the default: flatten, with a warning where it looks wrong)
        try:
            self._check_group(group)  # (before lr is read: a tensor lr of several elements is named here)
            if group["algorithm"] == ADAMW:
                self._settle_adamw_group_lr(group, given)
            # The lr this group starts from: the AdamW lr follows the lr schedule relative to it (_adamw.adamw_lr).
            group.setdefault("lr_at_creation", float(group["lr"]))
            self._check_adamw_lr(group)
            group["ns_compute_dtype"] = ns_dtype_name(group.get("ns_compute_dtype"))
            for j, p in enumerate(group["params"]):
                self._check_param(group, first_index + j, p)
            self._warn_about_routing(group, chose_view, names_from_pairs="param_names" not in given)
            # The step's device flags exist before any step (a compiled step then only mutates them).
            self.step_cache().allocate_flags(local(p).device for p in group["params"])
        except ValueError:
            self.param_groups.pop()
            raise

    @staticmethod
    def _settle_adamw_group_lr(group: dict, given: set[str]) -> None:
        """In a group with ``algorithm="adamw"`` every parameter takes the AdamW update, so the group's ``lr``
        *is* its AdamW lr (what LR monitors and schedulers see): ``adamw_lr`` when the group does not set
        ``lr`` itself, the group's own ``lr`` otherwise (both given and different: refused)."""
        if "lr" in given:
            if "adamw_lr" in given and group["adamw_lr"] is not None and group["adamw_lr"] != group["lr"]:
                raise ValueError(
                    f"Invalid adamw_lr: {group['adamw_lr']!r} in a group with algorithm='adamw' and "
                    f"lr={group['lr']!r}; such a group's lr is its AdamW lr: give one of them"
                )
            group["adamw_lr"] = float(group["lr"])  # (a tensor lr: read once, here, as lr_at_creation is)
        elif group["adamw_lr"] is not None:
            group["lr"] = float(group["adamw_lr"])

    def _warn_about_routing(self, group: dict, chose_view: bool, names_from_pairs: bool) -> None:
        """One warning per group for what a list of parameters may have sent to the wrong update (see
        ``_routing_checks``). ``chose_view``: the group or the optimizer set ``matrix_view`` (no warning);
        ``names_from_pairs``: the names came from ``(name, tensor)`` pairs (``named_parameters()``), not from
        groups that name their parameters themselves (``param_groups(model, with_names=True)``, routed already)."""
        name = type(self).__name__
        found = misrouted_by_name(group) if names_from_pairs else []
        if found:
            warnings.warn(misrouted_warning(name, found), UserWarning, stacklevel=4)
        if not chose_view and group.get("matrix_view") == "flatten":
            stacked = [self.param_label(0, p) for p in group["params"]
                       if self._is_matrix(group, p) and looks_like_stacked_matrices(p)]
            if stacked:
                warnings.warn(flattened_warning(name, stacked), UserWarning, stacklevel=4)

    def param_label(self, index: int, p: Tensor) -> str:
        """How messages name parameter ``p`` (flat position ``index``): by its name when the group has
        ``param_names``, else by group and position (``_naming.describe_param``)."""
        return describe_param(self.param_groups, p)

    def _check_param(self, group: dict, index: int, p: Tensor) -> None:
        check_dtensor_param(self.param_label(index, p), p)
        if p.is_complex():
            raise ValueError(f"Invalid {self.param_label(index, p)}: complex parameters are not supported")
        if p.ndim >= 2 and p.numel() == 0 and group["algorithm"] != ADAMW:
            raise ValueError(f"Invalid {self.param_label(index, p)}: an empty matrix cannot be orthogonalised")
        if group["algorithm"] == self._matrix_algorithm and p.ndim < 2:
            raise ValueError(
                f"Invalid {self.param_label(index, p)} in a group with algorithm="
                f"{self._matrix_algorithm!r}: it needs ndim >= 2 (use algorithm='adamw')"
            )

    def _check_adamw_lr(self, group: dict) -> None:
        """``adamw_lr`` is required when the group routes parameters to AdamW, unless the matrix lr is
        AdamW-scaled (``adjust_lr_fn="match_rms_adamw"``): a Muon lr such as 0.02 is far too large for AdamW."""
        if group["adamw_lr"] is not None or group["adjust_lr_fn"] == "match_rms_adamw":
            return
        for p in group["params"]:
            if not self._is_matrix(group, p):
                why = "the group has algorithm='adamw'" if group["algorithm"] == ADAMW else "it has ndim < 2"
                raise ValueError(
                    f"Invalid adamw_lr: None; {describe_param(self.param_groups, p)} goes to AdamW ({why}) and "
                    f"adjust_lr_fn={group['adjust_lr_fn']!r} does not scale the matrix lr to AdamW's. Pass adamw_lr= "
                    "(e.g. 3e-4) for the AdamW-routed parameters, or adjust_lr_fn='match_rms_adamw' to use lr for "
                    "both. Pass the model itself (limuon.LiMuon(model, ...)) rather than model.parameters(), so that "
                    "its embeddings and output layer go to AdamW too (a list of tensors cannot say which they are)"
                )

    def __getstate__(self) -> dict[str, Any]:
        # torch's __getstate__ keeps defaults, state and param_groups only: a copy would silently lose the
        # process group and step as a single process. A process group cannot be copied or pickled.
        if self.__dict__.get("_distributed_mesh") is not None:
            raise RuntimeError(
                f"{type(self).__name__} with distributed_mesh cannot be copied or pickled (a process group cannot); "
                "save optimizer.state_dict() (or use torch.distributed.checkpoint) and load it into a new optimizer"
            )
        return {**super().__getstate__(), "_distributed_mesh": None, "nonfinite": self.nonfinite}

    def _set_distributed_mesh(self, distributed_mesh: Any, nonfinite: str = "raise") -> None:
        """Validate and keep ``distributed_mesh`` and ``nonfinite`` (before ``Optimizer.__init__`` adds groups)."""
        check_choice("nonfinite", nonfinite, NONFINITE_MODES)
        resolve_group(distributed_mesh)
        self._distributed_mesh = distributed_mesh
        self.nonfinite = nonfinite

    def step_cache(self) -> StepCache:
        """Device tensors the step reuses (rebuilt after a copy or unpickling)."""
        cache = self.__dict__.get("_step_cache")
        if cache is None:
            cache = self.__dict__["_step_cache"] = StepCache()
        return cache

    @property
    def skipped_steps(self) -> Tensor:
        """How many steps were skipped on the device for a non-finite gradient (a 0-d tensor on the
        parameters' device, counted without a host read; read it when you want to know). Not part of the
        state dict: a loaded, copied or unpickled optimizer counts from 0."""
        return self.step_cache().allocate_flags([])

    def distribution(self) -> Distribution:
        """Matrix ownership across ranks (updated when parameters are added; owners never move)."""
        distribution = self.__dict__.get("_distribution")
        if distribution is None:
            distribution = self.__dict__["_distribution"] = Distribution(self.__dict__.get("_distributed_mesh"))
        params = [p for g in self.param_groups for p in g["params"]]
        key = tuple(id(p) for p in params)
        if self.__dict__.get("_distribution_key") != key:
            distribution.update(params)
            self.__dict__["_distribution_key"] = key
        return distribution

    def _begin_step(self, previous: list | None = None) -> StepGuard:
        """Check this step's gradients (types and presence: host-side) and find non-finite ones on the
        device. ``previous``: exact mode's (index, param, gradient at W_{k−1}) items, checked alike."""
        items = [(idx, p, p.grad) for idx, p in enumerate(self._all_params())]
        group = self.distribution().group
        check_presence(items, group=group, lost_state=self._lost_state(items), label=self.param_label)
        checked = [("gradient", items)] + ([("gradient at the previous iterate", previous)] if previous else [])
        return StepGuard(self.step_cache(), checked, group)

    def _settle(self, guard: StepGuard) -> None:
        """``nonfinite="raise"``: the step's one host read (before the first change that the device flag
        cannot undo, or at the end); raises with nothing changed. ``"skip"``: nothing to do."""
        if self.nonfinite == "raise":
            guard.settle(lambda: nonfinite_message(guard.checked, self.distribution().group, self.param_label))

    def _finish_step(self, guard: StepGuard) -> None:
        self._settle(guard)
        flags = self.step_cache().flags
        counter = self.step_cache().allocate_flags([guard.device])
        if counter.device != guard.device:  # (parameters moved after the optimizer was built: move it once)
            counter = flags["skipped"] = counter.to(guard.device)
        counter.add_(guard.found)

    def _lost_state(self, items: list[tuple[int, Tensor, Tensor | None]]) -> list[bool] | None:
        """Per item: state this rank needs for the step is missing (see check_gradients)."""
        return None

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _orthogonalizer(self, group: dict, bucket: Bucket) -> Orthogonalizer:
        """How the group orthogonalises this bucket's matrices (NS form, coefficients, compute dtype)."""
        device = bucket.local_params[0].device
        return orthogonalizer(group, bucket.shape, device, ns_dtype(group) or lk.get_ns_compute_dtype(device))

    def _check_group(self, group: dict) -> None:
        check_choice("algorithm", group.get("algorithm"), (None, ADAMW, self._matrix_algorithm))
        lr = group["lr"]
        if isinstance(lr, Tensor):  # (a tensor lr is never read back: its value is the user's to keep valid)
            if lr.numel() != 1 or not lr.is_floating_point():
                raise ValueError(f"Invalid lr: a tensor lr must be a one-element float tensor, got {lr.dtype} "
                                 f"{tuple(lr.shape)}")
        else:
            check_number("lr", lr, low=0.0)
        check_number("weight_decay", group["weight_decay"], low=0.0)
        check_adamw_group(group)

    def _is_matrix(self, group: dict, p: Tensor) -> bool:
        return group["algorithm"] != ADAMW and p.ndim >= 2

    def _split(self) -> list[tuple[dict, list[tuple[int, Tensor]], list[tuple[int, Tensor]]]]:
        """Per group: (group, [(index, matrix param with grad)], [(index, AdamW param with grad)])."""
        out = []
        idx = 0
        for group in self.param_groups:
            mats, others = [], []
            for p in group["params"]:
                if p.grad is not None:
                    (mats if self._is_matrix(group, p) else others).append((idx, p))
                idx += 1
            out.append((group, mats, others))
        return out

    def _adamw_step(self, group: dict, params: list[Tensor], guard: StepGuard, record_update: bool = False) -> None:
        if record_update or any("exp_avg" not in self.state.get(p, {}) for p in params):
            # (new state: a raised step must not leave it behind; exact mode's restore buffers: a known
            # finite step records them with one copy instead of a select)
            self._settle(guard)
        adamw_step(group, params, self.state, guard, record_update)

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict. Under FSDP2, a ``DTensor`` state entry that is a slice of a
        bucket's stacked tensor is returned as a copy (see ``is_inner_slice``): transient memory of at
        most this rank's share of the matrix state."""
        state_dict = super().state_dict()
        if self.distribution().sharded_group is None:
            return state_dict
        state = {}
        for pid, st in state_dict["state"].items():
            state[pid] = {k: wrap_like(v, local(v).clone()) if is_inner_slice(v) else v for k, v in st.items()}
        return {**state_dict, "state": state}

    def adapt_layouts(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with its parameter-shaped state laid out like this optimizer's parameters
        (see ``adapt_to_param``): a single-process state dict loads under FSDP2; a mismatch is refused
        before anything is changed."""
        saved_ids = [pid for g in state_dict.get("param_groups", []) for pid in g["params"]]
        params = self._all_params()
        if len(saved_ids) != len(params):
            return dict(state_dict)  # torch's load_state_dict explains what does not match
        state = dict(state_dict["state"])
        for index, (pid, p) in enumerate(zip(saved_ids, params)):
            if not isinstance(state.get(pid), dict):
                continue
            st = dict(state[pid])
            for key in PARAM_SHAPED_STATE:
                if isinstance(st.get(key), Tensor):
                    st[key] = adapt_to_param(self.param_label(index, p), key, p, st[key])
            state[pid] = st
        return {**state_dict, "state": state}

    def _complete_groups(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Saved param groups completed with this optimizer's settings for every key they lack: a
        torch.optim.Muon state dict (no AdamW settings, no ``ns_compute_dtype``) or one of an older
        version loads, and the missing hyperparameters are those this optimizer was built with."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"Invalid state_dict: expected a dict, got {type(state_dict).__name__}")
        for key, kind in (("state", dict), ("param_groups", list)):
            if not isinstance(state_dict.get(key), kind):
                raise ValueError(
                    f"Invalid state_dict: expected a {kind.__name__} under {key!r}, as Optimizer.state_dict() returns; "
                    f"got keys {sorted(map(str, state_dict))}"
                )
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            return dict(state_dict)  # torch's load_state_dict explains what does not match
        groups = [{**{k: v for k, v in ours.items() if k != "params"}, **theirs}
                  for ours, theirs in zip(self.param_groups, saved)]
        for ours, theirs in zip(self.param_groups, groups):  # refused before anything changes
            self._check_group({**theirs, "params": ours["params"]})
            self._check_adamw_lr({**theirs, "params": ours["params"]})
            theirs["ns_compute_dtype"] = ns_dtype_name(theirs.get("ns_compute_dtype"))
        return {**state_dict, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = self.adapt_layouts(self._complete_groups(state_dict))
        self.__dict__["_stacks"] = {}  # the old stacked tensors must not outlive the old state
        super().load_state_dict(state_dict)
        self.step_cache().forget_lr()
        self.steps_to_devices()

    def steps_to_devices(self) -> None:
        """Step counters live on their parameter's device as fp32 0-d tensors (the kernels read them there;
        a checkpoint holds them wherever it was saved or mapped)."""
        for p, st in self.state.items():
            step = st.get("step") if isinstance(st, dict) else None
            if step is not None:
                st["step"] = torch.as_tensor(step, dtype=torch.float32).to(local(p).device).reshape(())

    def check_backends(self) -> None:
        """Resolve the kernel backend for every device the parameters live on, before any update,
        so a misconfigured backend fails the step with nothing changed."""
        from limuon_kernels.backend import resolve

        for device in {p.device for p in self._all_params()}:
            resolve(device)

    def _check_all_groups(self) -> None:
        # Hyperparameters may have been changed since __init__ (schedulers, user code): re-check
        # before anything is modified, so a bad value fails loudly with nothing changed.
        for group in self.param_groups:
            self._check_group(group)
            self._check_adamw_lr(group)
        self.check_backends()
        self._warn_about_a_shared_schedule()

    def _warn_about_a_shared_schedule(self) -> None:
        """Once: a scheduler given one absolute lr for groups of different lrs (``OneCycleLR(max_lr=0.02)``,
        ``CyclicLR``) puts the AdamW group on the matrix lr's scale, as it would a twin torch.optim.AdamW's
        group; seen as equal ``initial_lr`` in groups created with different lrs (schedulers that start from
        each group's own lr give each its own)."""
        if self.__dict__.get("_warned_shared_schedule"):
            return
        starts = [(i, g["initial_lr"], g["lr_at_creation"]) for i, g in enumerate(self.param_groups)
                  if "initial_lr" in g and g["algorithm"] != ADAMW]
        for i, group in enumerate(self.param_groups):
            if group["algorithm"] != ADAMW or "initial_lr" not in group:
                continue
            same = [j for j, start, created in starts
                    if start == group["initial_lr"] and created != group["lr_at_creation"]]
            if same:
                self.__dict__["_warned_shared_schedule"] = True
                warnings.warn(
                    f"{type(self).__name__}: the lr scheduler gave param group {i} (algorithm='adamw', created with "
                    f"lr={group['lr_at_creation']:g}) the same schedule values as group {same[0]} (created with "
                    f"lr={self.param_groups[same[0]]['lr_at_creation']:g}): its AdamW lr now follows them. Give the "
                    "scheduler one value per group (e.g. OneCycleLR(opt, max_lr=[0.02, 3e-4])), as for any "
                    "torch optimizer whose groups have different lrs",
                    UserWarning, stacklevel=3)
                return
