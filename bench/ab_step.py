"""A/B timing of one optimizer step between two checkouts of this repository, interleaved in one session.

Each sample is a fresh process (``--tree`` puts that checkout's ``python/`` and ``bench/`` first on the path)
that builds one provider of ``bench_step.build`` on DistilGPT2's first 2 layers (as ``bench_step --quick``
on CPU), takes 2 warm-up steps and times ``--steps`` more; the driver alternates A and B ``--rounds`` times
so load changes hit both alike, and prints each side's median over all timed steps.

    python bench/ab_step.py --a /path/to/old --b . --providers muon,limuon1-approx [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
sys.path[:0] = [{tree!r} + "/python", {tree!r}, {tree!r} + "/bench"]
import bench_step
from _step_support import gpt2_specs
specs = gpt2_specs(2)
gen = torch.Generator().manual_seed(0)
params = [torch.nn.Parameter(torch.randn(s.shape, generator=gen) * 0.02) for s in specs]
grads = [torch.randn(s.shape, generator=gen) * 1e-3 for s in specs]
setup = bench_step.build({provider!r}, specs, params, 8)
def closure():
    for p, g in zip(params, grads):
        p.grad = g.clone()
times = []
for i in range(2 + {steps}):
    closure()
    t = time.perf_counter()
    setup.step(closure)
    if i >= 2:
        times.append((time.perf_counter() - t) * 1e3)
print(json.dumps(times))
"""


def sample(tree: str, provider: str, steps: int) -> list[float]:
    code = CHILD.format(tree=os.path.abspath(tree), provider=provider, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--providers", default="muon")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    results = {}
    for provider in args.providers.split(","):
        a, b = [], []
        for _ in range(args.rounds):
            a += sample(args.a, provider, args.steps)
            b += sample(args.b, provider, args.steps)
        results[provider] = {"a_median_ms": statistics.median(a), "b_median_ms": statistics.median(b),
                             "a_ms": a, "b_ms": b}
        print(f"{provider:<16} A {statistics.median(a):8.1f} ms   B {statistics.median(b):8.1f} ms   "
              f"B/A {statistics.median(b) / statistics.median(a):.2f}  ({len(a)} steps each)", flush=True)
    print(json.dumps({"load_1m": os.getloadavg()[0], "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
