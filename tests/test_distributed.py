"""LiMuon and Muon under DDP and FSDP2: 2 and 3 CPU processes (gloo, loopback) against the same
training in one process.

The model (tests/distributed_worker.py) has a conv weight, uneven row shards over 3 ranks (10 and 16
rows), a 2-row matrix (the third rank holds none of it), shapes with one matrix (most ranks own
none of them) and an unused matrix without a gradient. Exact mode's second closure call goes
through DDP/FSDP2 like the first.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import limuon

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def _fp32_newton_schulz():
    """This process's single-process runs use fp32 Newton–Schulz like the workers (see
    distributed_worker.pin_fp32_newton_schulz); module-scoped, so it is set before ``reference``."""
    import limuon_kernels.ops as ops

    saved = dict(ops._NS_COMPUTE_DTYPE)
    _worker().pin_fp32_newton_schulz()
    yield
    ops._NS_COMPUTE_DTYPE.clear()
    ops._NS_COMPUTE_DTYPE.update(saved)


def _worker():
    import distributed_worker

    return distributed_worker


def _single_process(config: str, steps: int = STEPS):
    """Parameters after ``steps`` steps in one process, and how many matrices were orthogonalised."""
    w = _worker()
    x, y = w.make_batch()
    model = w.make_model()
    opt = w.make_optimizer(config, model)
    with w.CountOrthogonalised() as counter:
        w.train(model, opt, x, y, steps)
    return w.full_params(model), counter.count


def _load_ranks(out_dir, world: int) -> list[dict]:
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _tolerance(config: str) -> dict:
    # Data parallelism changes the order of the gradient sums (fp32 rounding; measured at most 6e-7
    # after 4 steps). Exact mode keeps its last update in bf16, whose rounding follows those
    # differences (measured at most 1.3e-5). A real error (an update lost or applied twice, a wrong
    # shard) is of the order of lr = 0.02.
    return dict(atol=5e-5, rtol=0) if "exact" in config else dict(atol=5e-6, rtol=0)


@pytest.fixture(scope="module")
def reference():
    w = _worker()
    return {config: _single_process(config) for config in w.CONFIGS}


@pytest.mark.parametrize("engine,world", [("fsdp", 2), ("fsdp", 3), ("ddp-mesh", 2), ("ddp-group", 3)])
def test_matches_single_process(engine, world, reference, tmp_path):
    w = _worker()
    configs = list(w.CONFIGS)
    w.spawn(w.train_configs, world, engine, configs, STEPS, str(tmp_path))
    ranks = _load_ranks(tmp_path, world)
    for config in configs:
        expected, single_count = reference[config]
        for r, result in enumerate(ranks):
            got = result[config]["params"]
            assert got.keys() == expected.keys()
            for name in expected:
                torch.testing.assert_close(got[name], expected[name], **_tolerance(config),
                                           msg=lambda m, c=config, n=name, r=r: f"{c} rank {r} {n}: {m}")
            # The unused matrix has no gradient: it must not move (no weight decay either).
            torch.testing.assert_close(got["unused.weight"], w.make_model().unused.weight.detach(), atol=0, rtol=0)
        counts = [result[config]["orthogonalised"] for result in ranks]
        # Each matrix is orthogonalised once, by one rank, and every rank does a share.
        assert sum(counts) == single_count, (config, counts, single_count)
        assert all(0 < c < single_count for c in counts), (config, counts)


def test_ddp_without_mesh_repeats_the_work(reference, tmp_path):
    # distributed_mesh=None under DDP: each rank orthogonalises everything (the plain behaviour).
    w = _worker()
    configs = ["muon", "limuon-approx-r3"]
    w.spawn(w.train_configs, 2, "ddp-none", configs, STEPS, str(tmp_path))
    for result in _load_ranks(tmp_path, 2):
        for config in configs:
            expected, single_count = reference[config]
            assert result[config]["orthogonalised"] == single_count
            for name in expected:
                torch.testing.assert_close(result[config]["params"][name], expected[name], **_tolerance(config))


def test_failures_are_raised_on_every_rank_and_change_nothing(tmp_path):
    w = _worker()
    w.spawn(w.failing_steps, 2, str(tmp_path))
    for rank, result in enumerate(_load_ranks(tmp_path, 2)):
        nan, uneven, odd_layout = result["messages"]
        assert odd_layout is not None and "torch.chunk sizes" in odd_layout, (rank, odd_layout)
        assert nan is not None and nan.startswith("NonFiniteGradientError"), (rank, nan)
        index = [name for name, _ in w.make_model().named_parameters()].index("blocks.0.fc1.weight")
        assert f"parameter {index} " in nan and "at least one rank" in nan, nan
        assert uneven is not None and "some ranks and none on others" in uneven, (rank, uneven)
        assert result["unchanged"], rank


@pytest.mark.parametrize("config", ["limuon-exact-r3", "muon"])
def test_dcp_checkpoint_resumes(config, tmp_path):
    """Save with torch.distributed.checkpoint on 2 FSDP2 ranks; resume on 2 and on 3 ranks (the
    low-rank factors live on each matrix's owner, and owners change with the world size); from a
    full state dict that rank 0 gathered and saved alone, on 3 ranks; from each rank's own
    state_dict() on 2 ranks (and a clear refusal on 3)."""
    w = _worker()
    ckpt = str(tmp_path / "ckpt")
    (tmp_path / "straight").mkdir()
    w.spawn(w.checkpoint_save, 2, config, ckpt, str(tmp_path / "straight"))
    straight = _load_ranks(tmp_path / "straight", 2)[0]["params"]
    for world, how in ((2, "dcp"), (3, "dcp"), (3, "full"), (2, "per-rank"), (3, "per-rank")):
        out = tmp_path / f"out{world}{how}"
        out.mkdir()
        w.spawn(w.checkpoint_load, world, config, ckpt, str(out), how)
        results = _load_ranks(out, world)
        if how == "per-rank" and world == 3:
            # Each rank's own state_dict holds its shards: at another world size every rank refuses it.
            for result in results:
                assert "same world size only" in result.get("error", ""), result
            continue
        for r, result in enumerate(results):
            for name, value in straight.items():
                # Same world size: the same operations in the same order, so the same bits.
                tol = dict(atol=0, rtol=0) if world == 2 else _tolerance(config)  # per-rank: world 2
                torch.testing.assert_close(result["params"][name], value, **tol,
                                           msg=lambda m, n=name, r=r, ws=world: f"world {ws} rank {r} {n}: {m}")


def test_single_process_group_changes_nothing(tmp_path):
    """distributed_mesh on a 1-process group gives the plain single-process result, bit for bit."""
    w = _worker()
    w.spawn(w.train_configs, 1, "ddp-group", ["limuon-exact-r3", "muon"], STEPS, str(tmp_path))
    result = _load_ranks(tmp_path, 1)[0]
    for config in ("limuon-exact-r3", "muon"):
        expected, _ = _single_process(config)
        for name in expected:
            torch.testing.assert_close(result[config]["params"][name], expected[name], atol=0, rtol=0)


@pytest.mark.parametrize("config", ["limuon-exact-r3", "limuon-approx-dense", "muon"])
def test_single_process_state_dict_loads_under_fsdp2(config, reference, tmp_path):
    """A state dict saved by one process (whole tensors) loads into an FSDP2 optimizer on 3 ranks
    (each keeps its rows) and training continues as in one process."""
    w = _worker()
    w.spawn(w.from_single_process, 3, config, str(tmp_path))
    expected, _ = reference[config]
    for r, result in enumerate(_load_ranks(tmp_path, 3)):
        for name, value in expected.items():
            torch.testing.assert_close(result["params"][name], value, **_tolerance(config),
                                       msg=lambda m, n=name, r=r: f"rank {r} {n}: {m}")


def test_param_group_added_later_with_a_plain_matrix(tmp_path):
    """FSDP2, 3 ranks: a param group added after 2 steps (matrix owners must not move: the low-rank
    factors stay where they are) holding also a plain tensor of a sharded matrix's shape."""
    w = _worker()
    x, y = w.make_batch()
    model, extra = w.make_model(), w.make_extra()
    w.grow(model, extra, x, y)
    expected = {**w.full_params(model), "extra": extra.detach()}
    w.spawn(w.grow_fsdp, 3, str(tmp_path))
    for r, result in enumerate(_load_ranks(tmp_path, 3)):
        for name, value in expected.items():
            torch.testing.assert_close(result["params"][name], value, atol=1e-4, rtol=0,
                                       msg=lambda m, n=name, r=r: f"rank {r} {n}: {m}")


@pytest.mark.gpu
def test_fsdp2_nccl_on_one_gpu_runs_the_triton_kernels(tmp_path):
    """FSDP2 with NCCL on one GPU: the optimizer's ops run as Triton kernels there, and the result
    is that of the same training without FSDP2 on the same GPU."""
    import limuon_kernels as lk

    if lk.backend.resolve(torch.device("cuda")) != "triton":
        pytest.skip("the Triton backend is not usable on this GPU")
    w = _worker()
    configs = ["muon", "limuon-exact-r3", "limuon-approx-dense"]
    w.spawn(w.nccl_triton_fsdp, 1, configs, STEPS, str(tmp_path), backend="nccl")
    result = _load_ranks(tmp_path, 1)[0]
    assert {"newton_schulz", "rsvd", "storm_update_", "lowrank_storm"} <= set(result["triton_ops"]), result
    x, y = (t.cuda() for t in w.make_batch())
    for config in configs:
        model = w.make_model().cuda()
        w.train(model, w.make_optimizer(config, model), x, y, STEPS)
        for name, value in w.full_params(model).items():
            # bf16 Newton–Schulz on GPUs: the two runs agree to bf16 rounding of identical inputs.
            torch.testing.assert_close(result[config]["params"][name], value.cpu(), atol=1e-3, rtol=0,
                                       msg=lambda m, c=config, n=name: f"{c} {n}: {m}")


# -- argument checks (no process group needed) ----------------------------------------------------


@pytest.mark.parametrize("cls", [limuon.LiMuon, limuon.Muon])
def test_distributed_mesh_argument_errors(cls):
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    for bad in ("world", 0, object()):
        with pytest.raises(ValueError, match=r"Invalid distributed_mesh: .*expected None, a 1-D DeviceMesh"):
            cls(params, distributed_mesh=bad)
