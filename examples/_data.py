"""Synthetic token data shared by the examples: no downloads, reproducible from a seed."""

from __future__ import annotations

import torch
from torch import Tensor

SUCCESSORS = 4  # each token has this many equally likely successors


def markov_tokens(n_seq: int, seq_len: int, vocab: int, seed: int = 0) -> Tensor:
    """``(n_seq, seq_len)`` int64 tokens drawn from a fixed random Markov chain.

    Every token has ``SUCCESSORS`` equally likely successors, so a model that learns the chain's
    transitions brings the next-token cross-entropy from ``ln(vocab)`` (uniform guessing) down to
    ``ln(SUCCESSORS)`` ≈ 1.39 nats; how far a few steps get shows the optimizer is learning.
    """
    if n_seq < 1 or seq_len < 2 or vocab < 2:
        raise ValueError(f"markov_tokens needs n_seq ≥ 1, seq_len ≥ 2, vocab ≥ 2; got {n_seq}, {seq_len}, {vocab}")
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(vocab, (vocab, SUCCESSORS), generator=gen)
    tokens = torch.empty(n_seq, seq_len, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab, (n_seq,), generator=gen)
    for t in range(1, seq_len):
        pick = torch.randint(SUCCESSORS, (n_seq,), generator=gen)
        tokens[:, t] = successors[tokens[:, t - 1], pick]
    return tokens
