"""How a batch of decodes reads its keys and values out of the KV slab, by the slots it holds.

Run: ``python bench/bench_kv_rows.py [--batch 8] [--context 300] [--rounds 12]``.

A stage of 10 layers of SmolLM2-135M's shape (seeded dummy weights: the time does not depend on
the values) holds ``4 x batch`` sequences of ``context`` positions. One decode step of ``batch`` of
them is timed for several layouts of their slots, each read two ways, alternated within every
round on the same cache (``executors.llama.RANGE_ROWS_PER_SEQ``; docs/models.md, "The layer
math"):

- *gather*: the slots' rows copied out of the slab (index by slot), then attended;
- *view*: the slab's rows from the lowest slot to the highest read in place, each query at its
  slot's row, the rows between computed and dropped.

The default reads a view when the range is at most ``RANGE_ROWS_PER_SEQ`` rows per sequence. The
table gives the median step time and view / gather; both give the same numbers to the bit
(checked here).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import table  # noqa: E402

from helix_async.executors import llama  # noqa: E402

#: SmolLM2-135M's shape (docs/models.md)
SMOLLM2 = llama.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                            num_kv_heads=3, head_dim=64, rope_theta=1e5, tie_word_embeddings=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    b, ctx = args.batch, args.context
    st = llama.dummy_stage(SMOLLM2, 10, 20)
    layers = range(10, 20)
    caches = [llama.SeqCache() for _ in range(4 * b)]
    with torch.inference_mode():
        for c in caches:
            x = torch.randn(ctx, SMOLLM2.hidden_size, generator=torch.Generator().manual_seed(args.seed))
            for i in layers:
                x = st.layer(i, x, [(0, ctx)], [c], [ctx + 64])
    by_slot = sorted(caches, key=lambda c: c.slot)
    layouts = {
        "consecutive, in order": by_slot[:b],
        "consecutive, reversed": by_slot[:b][::-1],
        "every other slot": by_slot[::2][:b],
        f"{b} at random among {2 * b}": random.Random(args.seed).sample(by_slot[: 2 * b], b),
        "every third slot": by_slot[::3][:b],
    }
    ways = {"gather": 0, "view": 10**6}

    def step(sel: list[llama.SeqCache]) -> torch.Tensor:
        x = torch.randn(b, SMOLLM2.hidden_size, generator=torch.Generator().manual_seed(args.seed + 1))
        spans = [(ctx, 1)] * b
        st._plan = None
        with torch.inference_mode():
            for i in layers:
                x = st.layer(i, x, spans, sel, [ctx + 64] * b)
        return x

    times: dict[tuple[str, str], list[float]] = {}
    outs: dict[tuple[str, str], torch.Tensor] = {}
    default = llama.RANGE_ROWS_PER_SEQ
    try:
        for _ in range(args.rounds):
            for name, sel in layouts.items():
                for way, rows in ways.items():
                    llama.RANGE_ROWS_PER_SEQ = rows
                    t0 = time.perf_counter()
                    outs[name, way] = step(sel)
                    times.setdefault((name, way), []).append(time.perf_counter() - t0)
    finally:
        llama.RANGE_ROWS_PER_SEQ = default
    rows_out = []
    for name, sel in layouts.items():
        slots = [c.slot for c in sel]
        g, v = (statistics.median(times[name, w]) for w in ways)
        default_way = "view" if max(slots) - min(slots) + 1 <= default * b else "gather"
        same = torch.equal(outs[name, "gather"], outs[name, "view"])
        rows_out.append((name, f"{max(slots) - min(slots) + 1}", f"{g * 1e3:.1f}", f"{v * 1e3:.1f}", f"{v / g:.2f}x",
                         default_way, "yes" if same else "NO"))
    print(f"SmolLM2 shape, 10 layers, batch {b}, context {ctx}, {args.rounds} rounds, 1 thread; medians")
    print(table(rows_out, ("slots", "rows spanned", "gather ms", "view ms", "view/gather", "default", "same bits")))


if __name__ == "__main__":
    main()
