"""RSVD seeds: a 64-bit hash chain (splitmix64) over integer keys, so a seed depends on what it is for
(group seed, parameter index, matrix, step) and on nothing else.

    derive_seed(k1, ..., kn) = chain(k1, ..., kn) >> 1            (a non-negative int63)
    chain(k1, ..., kn)       = s(... s(s(0 ^ k1) ^ k2) ... ^ kn)    with s = splitmix64
A step's seed is ``derive_seed(*keys, t) = splitmix64(seed_key(*keys) ^ t) >> 1``: the optimizer keeps
``seed_key`` per matrix in a device tensor and the kernels finish the chain with the step counter on
the device, so no seed is computed on the host during a step.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def seed_key(*keys: int) -> int:
    """``chain(keys)`` as a signed int64 bit pattern (what an int64 tensor holds)."""
    h = 0
    for k in keys:
        h = splitmix64(h ^ (int(k) & MASK64))
    return h - (1 << 64) if h >= 1 << 63 else h


def derive_seed(*keys: int) -> int:
    """A well-mixed non-negative int63 seed from integer keys (e.g. seed, parameter index, step)."""
    return (seed_key(*keys) & MASK64) >> 1


def step_seed(key: int, step: int) -> int:
    """``derive_seed(*keys, step)`` from ``key = seed_key(*keys)``."""
    return splitmix64((key & MASK64) ^ (int(step) & MASK64)) >> 1
