"""Resident memory of a worker holding a stage of a real model, against one holding all of it.

Run: ``python bench/bench_rss.py [--model smollm2] [--stages 3] [--dtype float32]``.

Each stage is loaded in a fresh interpreter, as a worker process does (``executors.llama.load_stage``
through ``helix_async.models.weights``: only the stage's tensors are read, a GGUF de-quantised at
load). The child reports ``VmRSS`` after importing torch (the floor every worker pays), ``VmRSS``
after loading, ``VmHWM`` (the peak while loading) and the bytes of the tensors it holds. Linux only
(``/proc/self/status``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import table  # noqa: E402

from helix_async.model import get_model  # noqa: E402

CHILD = r"""
import json, sys
def status():
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out
import torch
from helix_async.executors.llama import load_stage
torch.set_num_threads(1)
base = status()["VmRSS"]
path, a, b, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
st = load_stage(path, a, b, dtype=dtype)
seen, held = set(), 0
tensors = [st.embed, st.norm, st.lm_head] + [t for lw in st.layers.values() for t in vars(lw).values()]
for t in tensors:
    if t is not None and t.data_ptr() not in seen:
        seen.add(t.data_ptr())
        held += t.numel() * t.element_size()
s = status()
print(json.dumps({"base": base, "rss": s["VmRSS"], "peak": s["VmHWM"], "held": held}))
"""


def measure(path: str, a: int, b: int, dtype: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, path, str(a), str(b), dtype], capture_output=True, text=True,
                         check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="a model name, GGUF file or checkpoint directory")
    ap.add_argument("--stages", type=int, default=3, help="split the layers into this many even stages")
    ap.add_argument("--dtype", default="", help="compute dtype (default: the checkpoint's; float32 for a GGUF)")
    args = ap.parse_args(argv)
    spec = get_model(args.model)
    if not spec.checkpoint:
        print(f"{spec.name} has no weights to read (a built-in name)", file=sys.stderr)
        return 2
    L, n = spec.num_layers, args.stages
    bounds = [round(i * L / n) for i in range(n + 1)]
    ranges = [(bounds[i], bounds[i + 1]) for i in range(n)] + [(0, L)]
    dtype = args.dtype or spec.dtype
    mib = 1 << 20
    rows = []
    full = None
    results = [(r, measure(spec.checkpoint, *r, dtype)) for r in ranges]
    full = results[-1][1]
    full_w = full["rss"] - full["base"]
    for (a, b), m in results:
        w = m["rss"] - m["base"]
        rows.append((f"[{a}, {b})", str(b - a), f"{m['held'] / mib:.1f}", f"{m['base'] / mib:.1f}", f"{m['rss'] / mib:.1f}",
                     f"{w / mib:.1f}", f"{m['peak'] / mib:.1f}", f"{w / full_w:.2f}"))
    print(f"{spec.name} ({spec.checkpoint}), {L} layers, compute dtype {dtype}; MiB")
    print(table(rows, ("layers", "count", "tensors", "RSS torch", "RSS loaded", "RSS - torch", "peak",
                       "share of all")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
