"""LiMuon in exact mode under PyTorch Lightning's automatic optimisation, on CPU, in seconds.

Lightning passes a closure to ``optimizer.step``: it runs ``training_step``, zeroes the gradients and
runs backward, on the same batch every time it is called. That is exactly what LiMuon's exact mode
(the paper's STORM momentum ``M_k = g(W_k) + μ·(M_{k−1} − g(W_{k−1}))``) needs, so
``configure_optimizers`` just returns the optimizer. From the second step on, LiMuon calls the
closure twice per step: ``training_step`` runs at the previous weights ``W_{k−1}`` (restored right
after; LiMuon's ``exact_restore`` says which parameters move back), then at the current ones ``W_k``.
Consequences worth knowing:

* Anything ``training_step`` logs is logged twice per step (once at each point). The training-step
  output Lightning keeps (``outputs`` of ``on_train_batch_end``) is the last call's, at ``W_k``, and so
  is the loss ``optimizer.step`` returns (logged in ``optimizer_step`` below).
* Gradient clipping (``gradient_clip_val``) and ``on_before_optimizer_step`` run after each call.
* Exact mode needs Lightning to pass the closure: fp32 and ``precision="bf16-mixed"`` do (and
  ``"16-mixed"`` on CPU, which Lightning runs as bf16); ``"16-mixed"`` on a GPU (a GradScaler),
  DeepSpeed and FSDP call the closure themselves, then ``step()`` without it, and
  ``accumulate_grad_batches > 1`` would give the call at ``W_{k−1}`` only the last micro-batch. Use
  ``variance_reduction="approx"`` there (one gradient per step, no closure).

The model is a small next-token MLP on synthetic Markov-chain tokens (``_data.py``); embeddings and
the output head go to LiMuon's AdamW part, as recommended. It trains, saves a checkpoint through
Lightning, and ``--resume`` continues from one (optimizer state included; a checkpoint taken
mid-epoch restarts the data order, as Lightning warns, since a plain DataLoader is not resumable)::

    python examples/lightning_limuon.py --steps 30 --out lightning_out
    python examples/lightning_limuon.py --steps 60 --out lightning_out --resume lightning_out/limuon.ckpt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import limuon

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import markov_tokens

VOCAB = 64


class TinyLM(nn.Module):
    """Embedding → two residual MLP blocks → head: logits ``(B, T, vocab)`` for tokens ``(B, T)``."""

    def __init__(self, vocab: int = VOCAB, width: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                          nn.Linear(4 * width, width), nn.Dropout(dropout))
            for _ in range(2)
        )
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def next_token_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]``."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


class LitLiMuon(pl.LightningModule):
    """A LightningModule whose optimizer is LiMuon; ``optimizer_kwargs`` go to ``limuon.LiMuon``."""

    def __init__(self, width: int = 64, dropout: float = 0.0, **optimizer_kwargs: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = TinyLM(VOCAB, width, dropout)
        self.optimizer_kwargs = {
            "lr": 0.02, "variance_reduction": "exact", "adamw_lr": 3e-3, **optimizer_kwargs,
        }

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        # In exact mode this runs twice per step (see the module docstring): log nothing here.
        return next_token_loss(self.model, batch[0])

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        loss = optimizer.step(closure=optimizer_closure)  # LiMuon returns the last call's loss, at W_k
        self.log("train_loss", loss, prog_bar=True)

    def configure_optimizers(self) -> limuon.LiMuon:
        # The model itself: hidden matrices get LiMuon; the embedding, the head, norms and biases AdamW
        # (limuon.param_groups' rules).
        return limuon.LiMuon(self.model, **self.optimizer_kwargs)


def make_loader(n_seq: int = 512, seq_len: int = 33, batch_size: int = 16, seed: int = 0) -> DataLoader:
    tokens = markov_tokens(n_seq, seq_len, VOCAB, seed=seed)
    return DataLoader(TensorDataset(tokens), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def make_trainer(max_steps: int, **kwargs: Any) -> pl.Trainer:
    """A quiet single-process CPU trainer (no logger, progress bar or automatic checkpoints)."""
    settings = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**settings, **kwargs})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="total optimizer steps (a resumed run counts old ones)")
    parser.add_argument("--out", type=Path, default=Path("lightning_out"), help="folder of the checkpoint")
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint to continue from")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op CPU threads; this tiny model gains nothing from more, and on a busy machine "
                             "OpenMP threads competing for cores made a run 30x slower")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be ≥ 1, got {args.steps}")
    if args.threads < 1:
        parser.error(f"--threads must be ≥ 1, got {args.threads}")
    torch.set_num_threads(args.threads)

    pl.seed_everything(0, verbose=False)
    module = LitLiMuon()
    trainer = make_trainer(args.steps)
    start = time.perf_counter()
    trainer.fit(module, make_loader(), ckpt_path=args.resume)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "limuon.ckpt"
    trainer.save_checkpoint(ckpt)
    loss = float(trainer.callback_metrics["train_loss"])
    print(f"{trainer.global_step} steps in {seconds:.1f} s, last loss {loss:.3f} nats "
          f"(uniform guessing: {torch.log(torch.tensor(float(VOCAB))):.2f}); checkpoint: {ckpt}")
    return {"steps": trainer.global_step, "seconds": seconds, "loss": loss, "checkpoint": ckpt}


if __name__ == "__main__":
    main()
