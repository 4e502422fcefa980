"""A NaN on one rank under DDP with low-rank momentum (distributed_mesh, 2 gloo ranks): every rank raises
(``"raise"``) or skips (``"skip"``, counted), and no rank changes a parameter or its factors U, S, V (which
each rank keeps replicated; a skipped step must not replace them)."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_ddp_lowrank_nan_on_one_rank_changes_nothing(mode, tmp_path):
    import distributed_worker
    import nonfinite_worker

    distributed_worker.spawn(nonfinite_worker.ddp_lowrank_nan, 2, mode, str(tmp_path))
    for rank in range(2):
        result = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"), weights_only=False)
        assert result["unchanged"], rank
        if mode == "raise":
            assert result["raised"] is not None and "parameter 1 " in result["raised"], result
        else:
            assert result["raised"] is None and result["skipped"] == 1.0, result
