"""Per-layer batch-time interpolation: compiled vs pure Python, in one run.

Run: ``python bench/bench_interp.py`` (needs the compiled build: ``pip install -e .``).
The simulator calls ``batch_time`` once per layer per batch, millions of times per run.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import ns_per_op, table  # noqa: E402

from helix_async.interp import BatchTimerC, BatchTimerPy  # noqa: E402
from helix_async.model import load_profiles  # noqa: E402


def main() -> int:
    if BatchTimerC is None:
        print("compiled extension not built (HELIX_NO_EXTENSIONS=1?); nothing to compare", file=sys.stderr)
        return 1
    rng = random.Random(0)
    rows = []
    for gpu in ("A100", "T4"):
        prof = load_profiles("llama2-70b").profile(gpu)
        args = (prof.prompt_x, prof.prompt_s, prof.decode_x, prof.decode_s)
        c, p = BatchTimerC(*args), BatchTimerPy(*args)
        batches = [
            (rng.randint(0, int(prof.prompt_x[-1])), rng.randint(0, int(prof.decode_x[-1]))) for _ in range(1000)
        ]

        def run_c(c=c, batches=batches) -> None:
            bt = c.batch_time
            for pt, ds in batches:
                bt(pt, ds)

        def run_p(p=p, batches=batches) -> None:
            bt = p.batch_time
            for pt, ds in batches:
                bt(pt, ds)

        nc = ns_per_op(run_c, len(batches))
        npy = ns_per_op(run_p, len(batches))
        rows.append((f"batch_time llama2-70b/{gpu}", f"{nc:.1f}", f"{npy:.1f}", f"{npy / nc:.1f}x"))
    print(table(rows, ("operation", "compiled ns/op", "python ns/op", "speed-up")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
