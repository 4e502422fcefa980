"""Training quality: a small GPT trained with AdamW, Muon and LiMuon on the same data, steps and schedule.

The paper's claim (docs/ALGORITHM.md §6) is LiMuon #1 < Muon < AdamW in validation loss at equal steps,
and LiMuon #2 close to Muon with far less optimizer state. This benchmark checks it at small scale,
and also at equal *gradient evaluations*: exact LiMuon (the paper's algorithm) spends two
forward/backward passes per step after the first, so at equal compute it has done half the steps.

Model: a scaled DistilGPT2 in plain PyTorch. Byte-level tokens (vocab 256), learned token and
position embeddings, pre-LN blocks (LayerNorm → causal self-attention through
``scaled_dot_product_attention`` with a fused QKV projection → residual; LayerNorm → GELU(tanh) MLP
of width 4d → residual), final LayerNorm, LM head **tied** to the token embedding (as DistilGPT2),
biases everywhere (as GPT-2), no dropout (runs are deterministic and comparable). GPT-2 init:
N(0, 0.02), residual output projections N(0, 0.02/√(2·layers)), zero biases. Full setting: 6 layers,
d = 768, 12 heads, sequence 512, batch 8 (the paper's DistilGPT2 run: 5000 steps of 8 × 512).

Data: the Python standard library's own source, read from ``sysconfig.get_paths()["stdlib"]``: every
``*.py`` file except those under ``site-packages``/``dist-packages`` (third-party) and
``test``/``tests``/``idle_test`` directories (absent from some distributions' Python), sorted by
relative POSIX path. Each file's bytes end with one ``0x00`` byte (the end-of-document token).
Split by file: file ``i`` of the sorted list is held out for validation when ``i % 10 == 9`` (every
10th file), so the splits are disjoint and deterministic. The corpus differs between Python versions:
every record carries the Python version, file and byte counts and a SHA-256 of the corpus.
Training batches: windows of ``seq + 1`` bytes at uniformly random offsets of the training stream,
drawn once from a fixed-seed generator, so every optimizer sees the same batches in the same order
(exact mode uses each step's batch for both of its gradient evaluations). Validation: the same fixed
``eval_batches × batch`` windows, evenly spaced over the validation stream, for every evaluation.

Optimizers (the same steps, batches and schedule for all):

* ``AdamW``: ``torch.optim.AdamW``, betas (0.9, 0.95).
* ``Muon``: ``limuon.Muon`` (torch.optim.Muon semantics: momentum 0.95, Nesterov, Keller NS5).
* ``LiMuon#1 exact``: ``limuon.LiMuon``, dense momentum, ``variance_reduction="exact"``
  (``step(closure)``, 2 gradient evaluations per step after the first), momentum 0.95.
* ``LiMuon#2 exact r8``: the same with ``rank=8`` (low-rank momentum, Option #2).
* ``LiMuon#1 approx``: dense momentum, ``variance_reduction="approx"`` (1 gradient evaluation/step).
* ``LiMuon#1 exact half``: exact LiMuon #1 run for **half the steps** with its own (compressed)
  schedule: ``2·(S/2) − 1`` gradient evaluations, the equal-compute counterpart of the others' ``S``.

In Muon/LiMuon the hidden matrices (QKV, attention output, MLP in/out) get the orthogonalised update;
the token and position embeddings (and so the tied head) are in an ``algorithm="adamw"`` group;
LayerNorm gains and biases go to AdamW automatically (ndim < 2). Those AdamW-routed parameters use
the best learning rate of the AdamW sweep (run first), so the hybrids differ from AdamW only in
the matrices. Weight decay 0.1 on the hidden matrices (every optimizer), 0 on embeddings, gains and
biases. Schedule: linear warmup over the first 5% of steps, then cosine decay to 10% of the peak,
applied to every learning rate (the matrix lr and the AdamW lr of the hybrids alike).

Learning-rate sweep (the peak lr of the optimizer's main update; the best final validation loss
wins). Exact LiMuon gets its own, lower range: in the ``--quick`` probe its best lr was 4-8x below
Muon's. Full setting: AdamW {3e-4, 6e-4, 1.2e-3}
(the paper used 1e-3), Muon and approx LiMuon {0.01, 0.02, 0.04} (Muon's usual 0.02 with
torch.optim.Muon's ``sqrt(max(1, m/n))`` lr scale), exact LiMuon {0.0025, 0.005, 0.01} (scaled from
the quick probe, not measured at this size). ``--quick`` (2-layer d = 128, 200 steps): AdamW
{1e-3, 2e-3}, Muon and approx LiMuon {0.02, 0.04}, exact LiMuon {0.005, 0.01}, chosen by a wider
probe on that setting (final val loss): AdamW 5e-4 2.59, 1e-3 2.45, 1.5e-3 2.45, 3e-3 2.70,
1e-2 2.68; Muon 0.01 2.29, 0.02 2.23, 0.04 2.19, 0.08 2.27; exact LiMuon #1 0.005 2.40, 0.01 2.40,
0.02 2.49, 0.04 2.52; exact LiMuon #2 0.0025 2.51, 0.005 2.50, 0.01 2.53, 0.02 2.78.

How to read it: every ``record: "curve"`` entry is one evaluation of one run, with ``step``,
``grad_evals`` (forward/backward passes so far), ``train_loss`` (mean over the steps since the
previous evaluation, at the weights each step started from) and ``val_loss`` (nats/byte). Equal steps:
the record at ``step == S``. Equal gradient evaluations: the last record with ``grad_evals <= S``
(for exact LiMuon run for S steps that is step S/2 — mid-schedule, its lr not yet decayed — and the
``exact half`` run is the fair equal-compute version). ``record: "best"`` entries give the best lr per
optimizer for both comparisons and ``record: "verdict"`` states whether the paper's ordering held.
A single seed: differences of a few hundredths of a nat at this scale are within seed noise.

    python bench/train_lm.py --quick            # 2-core CPU, a few minutes (1 thread when the CPU is busy)
    python bench/train_lm.py                    # the full setting, for a GPU
    python bench/train_lm.py --steps 2 --n-layer 1 --d-model 64 --n-head 2 --seq-len 32 --batch-size 2 --out -
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import limuon

try:  # the helpers shared by the benchmarks (bench/_common.py)
    from _common import device_slug, log, run_meta  # type: ignore[import-not-found]
except ImportError:  # an older tree: they lived in bench_kernels.py
    from bench_kernels import log, run_meta

    def device_slug(dev: torch.device, name: str) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower().split("(")[0]).strip("-")
        return slug if dev.type == "cuda" else f"cpu-{slug}-{os.cpu_count()}c"


VOCAB = 256
EOD = b"\x00"
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
VAL_EVERY_NTH_FILE = 10
WEIGHT_DECAY = 0.1
ADAMW_BETAS = (0.9, 0.95)
MOMENTUM = 0.95
LOWRANK = 8

# -- configuration --------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    n_layer: int = 6
    n_head: int = 12
    d_model: int = 768
    seq_len: int = 512
    batch_size: int = 8
    steps: int = 5000
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    eval_every: int = 250
    eval_batches: int = 16
    seed: int = 0
    bf16: bool = True  # bf16 autocast of forward/backward, on CUDA only (main() sets False on CPU: fp32)

    @property
    def warmup(self) -> int:
        return max(1, round(self.warmup_frac * self.steps))

    def name(self) -> str:
        return (f"gpt-L{self.n_layer}-d{self.d_model}-h{self.n_head} seq{self.seq_len}x{self.batch_size} "
                f"{self.steps} steps, stdlib bytes")


QUICK = Config(n_layer=2, n_head=4, d_model=128, seq_len=64, batch_size=16, steps=200, eval_every=20, eval_batches=8)
FULL = Config()
LRS_FULL = {"adamw": [3e-4, 6e-4, 1.2e-3], "matrix": [0.01, 0.02, 0.04], "exact": [0.0025, 0.005, 0.01]}
LRS_QUICK = {"adamw": [1e-3, 2e-3], "matrix": [0.02, 0.04], "exact": [0.005, 0.01]}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One optimizer: ``kind`` adamw/muon/limuon, LiMuon's mode and rank, and whether it runs half the steps."""

    label: str
    kind: str
    variance_reduction: str | None = None
    rank: int | None = None
    half_steps: bool = False

    @property
    def closure(self) -> bool:
        return self.variance_reduction == "exact"

    @property
    def sweep(self) -> str:
        """Which lr sweep: "adamw", "matrix" (Muon, one-gradient LiMuon) or "exact" (exact LiMuon)."""
        return "adamw" if self.kind == "adamw" else ("exact" if self.closure else "matrix")


SPECS = {
    "adamw": Spec("AdamW", "adamw"),
    "muon": Spec("Muon", "muon"),
    "limuon1-exact": Spec("LiMuon#1 exact", "limuon", "exact"),
    "limuon2-exact": Spec(f"LiMuon#2 exact r{LOWRANK}", "limuon", "exact", LOWRANK),
    "limuon1-approx": Spec("LiMuon#1 approx", "limuon", "approx"),
    "limuon1-exact-half": Spec("LiMuon#1 exact half", "limuon", "exact", half_steps=True),
}

# -- data -----------------------------------------------------------------------------------------


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's ``*.py`` files (no third-party, no test dirs), sorted by relative path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, val): file ``i`` is held out when ``i % 10 == 9``."""
    val = [f for i, f in enumerate(files) if i % VAL_EVERY_NTH_FILE == VAL_EVERY_NTH_FILE - 1]
    train = [f for i, f in enumerate(files) if i % VAL_EVERY_NTH_FILE != VAL_EVERY_NTH_FILE - 1]
    return train, val


def load_corpus(root: str | Path | None = None) -> tuple[Tensor, Tensor, dict]:
    """(train bytes, val bytes) as uint8 tensors, and a description of the corpus."""
    train_files, val_files = split_files(stdlib_files(root))
    digest = hashlib.sha256()
    streams = []
    for files in (train_files, val_files):
        blob = b"".join(f.read_bytes() + EOD for f in files)
        digest.update(blob)
        streams.append(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
    info = {
        "source": "python stdlib *.py (sysconfig stdlib; no site-packages/dist-packages/test dirs), sorted",
        "python": sys.version.split()[0], "split": f"by file: sorted index % {VAL_EVERY_NTH_FILE} == "
        f"{VAL_EVERY_NTH_FILE - 1} -> val", "files_train": len(train_files), "files_val": len(val_files),
        "bytes_train": streams[0].numel(), "bytes_val": streams[1].numel(), "sha256": digest.hexdigest()[:16],
    }  # fmt: skip
    return streams[0], streams[1], info


def train_batch_starts(n_bytes: int, cfg: Config) -> Tensor:
    """(steps, batch) window offsets into the training stream: the one data order of every run."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return torch.randint(0, n_bytes - cfg.seq_len - 1, (cfg.steps, cfg.batch_size), generator=gen)


def val_batch_starts(n_bytes: int, cfg: Config) -> Tensor:
    """(eval_batches, batch) evenly spaced window offsets into the validation stream."""
    n = cfg.eval_batches * cfg.batch_size
    starts = torch.linspace(0, n_bytes - cfg.seq_len - 1, n).long()
    return starts.view(cfg.eval_batches, cfg.batch_size)


def get_batch(data: Tensor, starts: Tensor, seq_len: int, dev: torch.device) -> tuple[Tensor, Tensor]:
    idx = starts[:, None] + torch.arange(seq_len + 1)
    chunk = data[idx].long().to(dev, non_blocking=True)
    return chunk[:, :-1], chunk[:, 1:]


# -- model ----------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """Scaled DistilGPT2: byte vocabulary, pre-LN blocks, LM head tied to the token embedding."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T

    def param_groups(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """(hidden matrices, embeddings (= tied head), LayerNorm gains and biases)."""
        hidden = [p for p in self.blocks.parameters() if p.ndim >= 2]
        embed = [self.wte.weight, self.wpe.weight]
        other = [p for p in self.blocks.parameters() if p.ndim < 2] + list(self.ln_f.parameters())
        return hidden, embed, other


# -- optimizers and schedule ----------------------------------------------------------------------


def make_optimizer(
    model: GPT, spec: Spec, lr: float, adamw_lr: float, seed: int = 0, momentum: float = MOMENTUM,
) -> torch.optim.Optimizer:
    """``lr``: the main lr (AdamW's, or the matrix lr); ``adamw_lr``: the hybrids' AdamW-routed params."""
    hidden, embed, other = model.param_groups()
    if spec.kind == "adamw":
        return torch.optim.AdamW(
            [{"params": hidden, "weight_decay": WEIGHT_DECAY}, {"params": embed + other, "weight_decay": 0.0}],
            lr=lr, betas=ADAMW_BETAS,
        )
    groups = [
        {"params": hidden + other},  # matrices -> orthogonalised update, 1-D -> AdamW automatically
        {"params": embed, "algorithm": "adamw"},
    ]
    common = dict(lr=lr, weight_decay=WEIGHT_DECAY, momentum=momentum, adamw_lr=adamw_lr, adamw_betas=ADAMW_BETAS,
                  adamw_weight_decay=0.0)
    if spec.kind == "muon":
        return limuon.Muon(groups, **common)
    return limuon.LiMuon(groups, rank=spec.rank, variance_reduction=spec.variance_reduction, seed=seed, **common)


def lr_factor(step: int, cfg: Config) -> float:
    """Multiplier of the peak lr for 0-based ``step``: linear warmup, then cosine to ``min_lr_frac``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, bases: list[dict[str, float]], factor: float) -> None:
    for group, base in zip(opt.param_groups, bases):
        for key, value in base.items():
            group[key] = value * factor


# -- training -------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: GPT, data: Tensor, starts: Tensor, cfg: Config, dev: torch.device) -> float:
    model.eval()
    total = 0.0
    for row in starts:
        x, y = get_batch(data, row, cfg.seq_len, dev)
        with autocast(dev, cfg):
            total += F.cross_entropy(model(x).float().view(-1, VOCAB), y.reshape(-1)).item()
    model.train()
    return total / len(starts)


def autocast(dev: torch.device, cfg: Config) -> torch.autocast:
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16 and dev.type == "cuda")


def eval_steps(cfg: Config) -> set[int]:
    """Steps after which to evaluate: 0, every ``eval_every``, the end, and (S+1)//2 — where exact
    LiMuon has used 2·step − 1 ≤ S gradient evaluations (the equal-compute point)."""
    return {0, cfg.steps, (cfg.steps + 1) // 2, *range(cfg.eval_every, cfg.steps, cfg.eval_every)}


def train(
    cfg: Config, train_data: Tensor, val_data: Tensor, spec: Spec, lr: float, adamw_lr: float,
    dev: torch.device, progress: Callable[[str], None] | None = None, momentum: float = MOMENTUM,
) -> list[dict]:
    """Train one model with one optimizer; one dict per evaluation (step, grad_evals, losses, timing).

    With ``spec.half_steps`` the run takes the first ``steps // 2`` batches with a schedule of that
    length. A non-finite loss stops the run (its last record has ``diverged: True``).
    """
    full_cfg = cfg
    if spec.half_steps:
        cfg = dataclasses.replace(cfg, steps=cfg.steps // 2)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(dev)
    opt = make_optimizer(model, spec, lr, adamw_lr, cfg.seed, momentum)
    # Only "lr" is scheduled: Muon/LiMuon scale adamw_lr by lr / lr_at_creation themselves, so
    # scheduling adamw_lr here too would apply the factor twice to the AdamW-routed parameters.
    bases = [{"lr": g["lr"]} for g in opt.param_groups]
    starts = train_batch_starts(train_data.numel(), full_cfg)[: cfg.steps]
    vstarts = val_batch_starts(val_data.numel(), cfg)
    evals_at = eval_steps(cfg)
    grad_evals = 0
    losses: list[Tensor] = []
    times: list[float] = []
    t0 = time.perf_counter()

    def record(step: int, diverged: bool = False) -> dict:
        train_loss = torch.stack(losses).mean().item() if losses else None
        val = None if diverged else evaluate(model, val_data, vstarts, cfg, dev)
        losses.clear()
        rec = {"step": step, "grad_evals": grad_evals, "train_loss": train_loss, "val_loss": val,
               "median_ms": statistics.median(times) if times else None, "diverged": diverged}
        if progress:
            tl = "-" if train_loss is None else f"{train_loss:.4f}"
            vl = "-" if val is None else f"{val:.4f}"
            progress(f"step {step:>5}/{cfg.steps} evals {grad_evals:>5} train {tl} val {vl} "
                     f"({time.perf_counter() - t0:.1f}s){' DIVERGED' if diverged else ''}")
        return rec

    out = [record(0)]
    for step in range(cfg.steps):
        x, y = get_batch(train_data, starts[step], cfg.seq_len, dev)
        set_lr(opt, bases, lr_factor(step, cfg))

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            nonlocal grad_evals
            opt.zero_grad(set_to_none=True)
            with autocast(dev, cfg):
                loss = F.cross_entropy(model(x).float().view(-1, VOCAB), y.reshape(-1))
            loss.backward()
            grad_evals += 1
            return loss

        ts = time.perf_counter()
        try:
            if spec.closure:
                loss = opt.step(closure)
            else:
                loss = closure()
                opt.step()
        except limuon.NonFiniteGradientError:
            out.append(record(step + 1, diverged=True))
            break
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(1e3 * (time.perf_counter() - ts))
        losses.append(loss.detach())
        if step + 1 in evals_at:  # AdamW does not refuse NaN gradients: check the loss here
            out.append(record(step + 1, diverged=not math.isfinite(loss.item())))
            if out[-1]["diverged"]:
                break
    return out


def run_seconds(cfg: Config, names: list[str], lrs: dict[str, list[float]], train_data: Tensor,
                val_data: Tensor, dev: torch.device, probe_steps: int = 4) -> dict[str, float]:
    """Seconds one training run of each optimizer in ``names`` will take: a ``probe_steps``-step run
    of each gives its median step time and (the rest of that run's wall time, per evaluation) the
    evaluation time, scaled to the setting's steps and evaluations. A run of each lr costs the same."""
    out = {}
    probe_steps = max(1, min(probe_steps, cfg.steps))
    probe = dataclasses.replace(cfg, steps=probe_steps, eval_every=probe_steps)
    for key in names:
        spec = SPECS[key]
        t0 = time.perf_counter()
        curve = train(probe, train_data, val_data, spec, lrs[spec.sweep][0], lrs["adamw"][0], dev)
        step_s = curve[-1]["median_ms"] / 1e3
        eval_s = max(0.0, time.perf_counter() - t0 - probe_steps * step_s) / len(curve)
        run = dataclasses.replace(cfg, steps=cfg.steps // 2) if spec.half_steps else cfg
        out[key] = run.steps * step_s + len(eval_steps(run)) * eval_s
    return out


def cpu_threads(threads: int | None, dev: torch.device) -> None:
    """torch's intra-op threads: ``threads`` if given, else 1 on a busy CPU (other processes hold the
    cores: spinning OpenMP threads then cost far more than they give), else torch's default."""
    if threads:
        torch.set_num_threads(threads)
    elif dev.type == "cpu" and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        torch.set_num_threads(1)
        log(f"# load average {os.getloadavg()[0]:.1f}: running on 1 thread (--threads to choose)")


# -- summary --------------------------------------------------------------------------------------


def summarize(runs: list[dict], cfg: Config) -> tuple[list[dict], dict]:
    """Best lr per optimizer at equal steps and at equal gradient evaluations, and the verdict."""
    budget = cfg.steps
    best: dict[str, dict] = {}
    for run in runs:
        curve, spec = run["curve"], run["spec"]
        final = curve[-1]
        at_steps = final["val_loss"] if final["step"] == cfg.steps and not final["diverged"] else None
        within = [r for r in curve if r["grad_evals"] <= budget and r["val_loss"] is not None]
        at_evals = within[-1] if within else None
        b = best.setdefault(spec.label, {"optimizer": spec.label, "equal_steps": None, "equal_grad_evals": None})
        if at_steps is not None and not spec.half_steps:
            cur = b["equal_steps"]
            if cur is None or at_steps < cur["val_loss"]:
                b["equal_steps"] = {"lr": run["lr"], "step": final["step"], "grad_evals": final["grad_evals"],
                                    "val_loss": at_steps, "train_loss": final["train_loss"]}
        if at_evals is not None:
            cur = b["equal_grad_evals"]
            if cur is None or at_evals["val_loss"] < cur["val_loss"]:
                b["equal_grad_evals"] = {"lr": run["lr"], "step": at_evals["step"],
                                         "grad_evals": at_evals["grad_evals"], "val_loss": at_evals["val_loss"]}

    def val(label: str, key: str) -> float | None:
        entry = best.get(label, {}).get(key)
        return entry["val_loss"] if entry else None

    def ordering(key: str, l1: str) -> tuple[bool | None, str]:
        a, m, w = val(l1, key), val("Muon", key), val("AdamW", key)
        if None in (a, m, w):
            return None, "not all three optimizers ran"
        held = a < m < w
        ranked = sorted([(a, l1), (m, "Muon"), (w, "AdamW")])
        return held, " < ".join(f"{n} {v:.4f}" for v, n in ranked)

    l1, l1h, l2 = "LiMuon#1 exact", "LiMuon#1 exact half", f"LiMuon#2 exact r{LOWRANK}"
    verdict: dict = {"claim": "LiMuon#1 < Muon < AdamW in validation loss", "budget_grad_evals": budget}
    verdict["equal_steps_holds"], verdict["equal_steps_order"] = ordering("equal_steps", l1)
    verdict["equal_grad_evals_holds"], verdict["equal_grad_evals_order"] = ordering("equal_grad_evals", l1)
    if val(l1h, "equal_grad_evals") is not None:
        verdict["equal_grad_evals_own_schedule_holds"], verdict["equal_grad_evals_own_schedule_order"] = (
            ordering("equal_grad_evals", l1h))
    for key in ("equal_steps", "equal_grad_evals"):
        ranked = sorted((val(b, key), b) for b in best if val(b, key) is not None)
        verdict[f"{key}_ranking"] = " < ".join(f"{n} {v:.4f}" for v, n in ranked)
    if val(l2, "equal_steps") is not None and val("Muon", "equal_steps") is not None:
        verdict["limuon2_minus_muon_equal_steps"] = val(l2, "equal_steps") - val("Muon", "equal_steps")
    return list(best.values()), verdict


def verdict_text(v: dict) -> list[str]:
    def yn(x: bool | None) -> str:
        return "n/a" if x is None else ("HOLDS" if x else "does NOT hold")

    lines = [f"equal steps: {v['claim']} {yn(v['equal_steps_holds'])}: {v['equal_steps_order']}",
             f"equal grad evals (<= {v['budget_grad_evals']}; exact LiMuon at half its steps, mid-schedule): "
             f"{yn(v['equal_grad_evals_holds'])}: {v['equal_grad_evals_order']}"]
    if "equal_grad_evals_own_schedule_holds" in v:
        lines.append(f"equal grad evals, exact LiMuon #1 run for half the steps with its own schedule: "
                     f"{yn(v['equal_grad_evals_own_schedule_holds'])}: {v['equal_grad_evals_own_schedule_order']}")
    if "limuon2_minus_muon_equal_steps" in v:
        lines.append(f"LiMuon#2 (rank {LOWRANK}) minus Muon at equal steps: {v['limuon2_minus_muon_equal_steps']:+.4f}")
    lines.append(f"all, equal steps: {v['equal_steps_ranking']}")
    lines.append(f"all, equal grad evals: {v['equal_grad_evals_ranking']}")
    lines.append("single seed, small model: read differences of a few hundredths of a nat as noise")
    return lines


def plot(runs: list[dict], best: list[dict], cfg: Config, device: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    chosen = {b["optimizer"]: (b["equal_steps"] or b["equal_grad_evals"] or {}).get("lr") for b in best}
    lows, highs = [], []
    for run in runs:
        spec = run["spec"]
        if chosen.get(spec.label) != run["lr"]:
            continue
        pts = [r for r in run["curve"] if r["val_loss"] is not None]
        style = "--" if spec.half_steps else "-"
        label = f"{spec.label} (lr {run['lr']:g})"
        for ax, key in zip(axes, ("step", "grad_evals")):
            ax.plot([r[key] for r in pts], [r["val_loss"] for r in pts], style, marker=".", label=label)
        vals = [r["val_loss"] for r in pts if r["step"] >= 0.2 * cfg.steps]
        lows += vals
        highs += vals[:1]
    for ax, key in zip(axes, ("step", "grad evaluations (forward+backward passes)")):
        ax.axvline(cfg.steps, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    if lows:
        span = max(highs) - min(lows)
        axes[0].set_ylim(min(lows) - 0.1 * span, max(highs) + 0.1 * span)
    axes[0].set_ylabel("validation loss (nats / byte)")
    axes[0].set_title("equal steps")
    axes[1].set_title(f"equal gradient evaluations (dotted: {cfg.steps})")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{cfg.name()} | best lr per optimizer | {device}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------


def parse_lrs(text: str | None) -> list[float] | None:
    return [float(x) for x in text.split(",")] if text else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2-layer d=128 model, 200 steps, 2 lrs: a few CPU minutes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--optimizers", default=",".join(SPECS), help=f"comma-separated subset of {','.join(SPECS)}")
    ap.add_argument("--adamw-lrs", help="comma-separated AdamW lr sweep (overrides the default)")
    ap.add_argument("--matrix-lrs", help="comma-separated lr sweep of Muon and one-gradient LiMuon")
    ap.add_argument("--exact-lrs", help="comma-separated lr sweep of exact LiMuon")
    ap.add_argument("--momentum", type=float, default=MOMENTUM, help="Muon and LiMuon momentum (LiMuon: 1 - beta)")
    for f in dataclasses.fields(Config):
        if f.type in ("int", "float"):
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=int if f.type == "int" else float,
                            help=f"override the setting's {f.name}")
    ap.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    ap.add_argument("--threads", type=int, help="torch intra-op CPU threads (1 is steadier on a busy shared CPU)")
    ap.add_argument("--out", default=None, help="JSON path ('-': no JSON, no PNG; default bench/results/train-...)")
    args = ap.parse_args(argv)
    names = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if bad := [o for o in names if o not in SPECS]:
        ap.error(f"unknown optimizer(s) {bad}; expected a subset of {list(SPECS)}")
    cfg = QUICK if args.quick else FULL
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                 if getattr(args, f.name, None) is not None}
    cfg = dataclasses.replace(cfg, **overrides, bf16=not args.no_bf16 and args.device.startswith("cuda"))
    lrs = dict(LRS_QUICK if args.quick else LRS_FULL)
    lrs["adamw"] = parse_lrs(args.adamw_lrs) or lrs["adamw"]
    lrs["matrix"] = parse_lrs(args.matrix_lrs) or lrs["matrix"]
    lrs["exact"] = parse_lrs(args.exact_lrs) or lrs["exact"]

    dev = torch.device(args.device)
    cpu_threads(args.threads, dev)
    meta = {**run_meta(dev, args.quick), "bench": "train"}
    train_data, val_data, data_info = load_corpus()
    case = {"name": cfg.name(), **dataclasses.asdict(cfg), "warmup_steps": cfg.warmup,
            "schedule": f"linear warmup {cfg.warmup} steps, cosine to {cfg.min_lr_frac} x peak",
            "tied_head": True, "vocab": VOCAB, "params": sum(p.numel() for p in GPT(cfg).parameters()),
            "data": data_info, "lr_sweep": lrs}  # fmt: skip
    print(f"# {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {cfg.name()}")
    print(f"# data: {data_info['files_train']} train files ({data_info['bytes_train'] / 1e6:.1f} MB), "
          f"{data_info['files_val']} val files ({data_info['bytes_val'] / 1e6:.1f} MB), python {data_info['python']}")
    print(f"# model: {case['params'] / 1e6:.2f} M params | lr sweeps: {lrs}")
    n_runs = sum(len(lrs[SPECS[k].sweep]) for k in names)
    per_run = run_seconds(cfg, names, lrs, train_data, val_data, dev)
    est = sum(len(lrs[SPECS[k].sweep]) * s for k, s in per_run.items())
    print(f"# plan: train takes about {est / 60:.1f} min on this device ({n_runs} runs, estimated from a "
          "few-step probe of each optimizer)", flush=True)

    start = time.perf_counter()
    runs: list[dict] = []
    adamw_best = None
    # AdamW first: its best lr is the lr of the hybrids' AdamW-routed parameters.
    for key in sorted(names, key=lambda k: SPECS[k].kind != "adamw"):
        spec = SPECS[key]
        if spec.kind != "adamw" and adamw_best is None:
            adamw_best = lrs["adamw"][len(lrs["adamw"]) // 2]
            log(f"# no AdamW run: the hybrids' AdamW-routed parameters use lr {adamw_best:g}")
        for lr in lrs[spec.sweep]:
            tag = f"{spec.label} lr={lr:g}"
            curve = train(cfg, train_data, val_data, spec, lr, adamw_best or lr, dev, momentum=args.momentum,
                          progress=lambda s, tag=tag: log(f"  [{time.perf_counter() - start:6.1f}s] {tag:<30} {s}"))
            runs.append({"spec": spec, "lr": lr, "curve": curve})
        if spec.kind == "adamw":
            done = [r for r in runs if r["spec"] is spec and r["curve"][-1]["val_loss"] is not None]
            adamw_best = min(done, key=lambda r: r["curve"][-1]["val_loss"])["lr"] if done else lrs["adamw"][0]
    wall = time.perf_counter() - start

    best, verdict = summarize(runs, cfg)
    records = []
    for run in runs:
        spec = run["spec"]
        provider = {"optimizer": spec.label, "kind": spec.kind, "variance_reduction": spec.variance_reduction,
                    "rank": spec.rank, "lr": run["lr"], "adamw_lr": run["lr"] if spec.kind == "adamw" else adamw_best,
                    "steps": cfg.steps // 2 if spec.half_steps else cfg.steps,
                    "momentum": None if spec.kind == "adamw" else args.momentum}
        for r in run["curve"]:
            records.append({**meta, "case": case, "record": "curve", "provider": f"{spec.label} lr={run['lr']:g}",
                            "provider_config": provider, **r})
    for b in best:
        records.append({**meta, "case": case, "record": "best", "provider": b["optimizer"], **b})
    records.append({**meta, "case": case, "record": "verdict", "wall_s": wall, **verdict,
                    "text": verdict_text(verdict)})

    print_table(best, cfg)
    for line in verdict_text(verdict):
        print(f"# {line}")
    print(f"# wall {wall:.1f}s")
    if args.out != "-":
        stem = f"train-{device_slug(dev, meta['device'])}-{datetime.date.today()}"
        out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"{stem}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records, indent=1) + "\n")
        png = out.with_suffix(".png")
        plot(runs, best, cfg, meta["device"], png)
        print(f"# wrote {len(records)} records to {out} and the curves to {png}")
    return 0


def print_table(best: list[dict], cfg: Config) -> None:
    head = ("optimizer", "lr @steps", f"val @ step {cfg.steps}", "evals",
            "lr @evals", f"val @ <= {cfg.steps} evals", "step")
    rows = [head]
    for b in best:
        s, e = b["equal_steps"], b["equal_grad_evals"]
        rows.append((b["optimizer"],
                     *((f"{s['lr']:g}", f"{s['val_loss']:.4f}", str(s["grad_evals"])) if s else ("-", "-", "-")),
                     *((f"{e['lr']:g}", f"{e['val_loss']:.4f}", str(e["step"])) if e else ("-", "-", "-"))))
    widths = [max(len(x) for x in col) for col in zip(*rows)]
    for i, row in enumerate(rows):
        print("  ".join(x.ljust(w) if j == 0 else x.rjust(w) for j, (x, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    sys.exit(main())
