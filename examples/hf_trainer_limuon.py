"""LiMuon (approx mode) training a tiny GPT-2 with Hugging Face's Trainer, on CPU, in seconds.

The Trainer calls ``optimizer.step()`` without a closure (through accelerate's ``AcceleratedOptimizer``),
after its own gradient clipping (``max_grad_norm``), and steps its learning-rate schedule after each
step. So use ``variance_reduction="approx"`` (one gradient per step: MARS-style correction, no extra
state); exact mode refuses the first step with an error asking for a closure. The schedule scales
the matrix ``lr`` and LiMuon's AdamW lr by the same factor.

Everything runs offline: the model is ``GPT2LMHeadModel`` built from a small ``GPT2Config`` (no
download), the data synthetic Markov-chain tokens (``_data.py``). The token and position embeddings
(the LM head shares the token embedding) go to LiMuon's AdamW part; LayerNorms and biases go there
anyway (1-D). GPT-2 stores its linear layers as ``Conv1D`` with weights ``(in, out)``, the transpose of
``nn.Linear``'s; orthogonalisation does not care, but the default shape-dependent lr scale
``sqrt(max(1, m/n))`` would, so this example uses ``adjust_lr_fn="match_rms_adamw"``
(``0.2·sqrt(max(m, n))``, symmetric, and an AdamW-sized ``lr``).

Checkpoints are the Trainer's own (``checkpoint-N/`` with ``optimizer.pt``, ``scheduler.pt``, RNG state);
``--resume`` continues from the last one in ``--out``::

    python examples/hf_trainer_limuon.py --steps 30 --out hf_out
    python examples/hf_trainer_limuon.py --steps 60 --out hf_out --resume
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import limuon

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import markov_tokens

VOCAB, SEQ_LEN = 64, 32


def tiny_gpt2(seed: int = 0, width: int = 64, layers: int = 2, heads: int = 4) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 (dropout off, so runs are reproducible)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=width, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    return GPT2LMHeadModel(config)


def token_dataset(n_seq: int = 512, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Causal-LM examples: the model shifts ``labels`` itself."""
    return [{"input_ids": t, "labels": t} for t in markov_tokens(n_seq, SEQ_LEN, VOCAB, seed=seed)]


def make_optimizer(model: GPT2LMHeadModel, **overrides: Any) -> limuon.LiMuon:
    """LiMuon for the transformer blocks' matrices, AdamW (inside LiMuon) for the embeddings (wte is also
    the LM head), norms and biases: the model itself is passed, routed by limuon.param_groups."""
    kwargs = dict(lr=0.02, momentum=0.95, variance_reduction="approx", adjust_lr_fn="match_rms_adamw",
                  adamw_lr=0.01, weight_decay=0.0)
    kwargs.update(overrides)
    return limuon.LiMuon(model, **kwargs)


def training_args(out: Path, steps: int, **overrides: Any) -> TrainingArguments:
    """CPU, batch 16, a checkpoint every ``save_steps`` (default: at the end), no reporting."""
    settings = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=16, use_cpu=True,
                    save_strategy="steps", save_steps=steps, logging_steps=10, seed=0, report_to="none",
                    disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=1.0)
    settings.update(overrides)
    return TrainingArguments(**settings)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="total optimizer steps (a resumed run counts old ones)")
    parser.add_argument("--out", type=Path, default=Path("hf_out"), help="the Trainer's output_dir (checkpoints)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op CPU threads; this tiny model gains nothing from more, and on a busy machine "
                             "OpenMP threads competing for cores made a run 30x slower")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be ≥ 1, got {args.steps}")
    if args.threads < 1:
        parser.error(f"--threads must be ≥ 1, got {args.threads}")
    torch.set_num_threads(args.threads)

    model = tiny_gpt2()
    trainer = Trainer(model=model, args=training_args(args.out, args.steps), train_dataset=token_dataset(),
                      optimizers=(make_optimizer(model), None))  # None: the Trainer's linear schedule
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    seconds = time.perf_counter() - start
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    last = f", last logged {logged[-1]:.3f}" if logged else ""
    print(f"{trainer.state.global_step} steps in {seconds:.1f} s, mean training loss of this run "
          f"{result.training_loss:.3f}{last} nats (uniform guessing: {torch.log(torch.tensor(float(VOCAB))):.2f}); "
          f"checkpoints in {args.out}")
    return {"steps": trainer.state.global_step, "seconds": seconds, "loss": result.training_loss, "out": args.out}


if __name__ == "__main__":
    main()
