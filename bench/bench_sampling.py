"""The last stage's sampler (helix_async/executors/sampling.py): what each kind of request costs per
token, against the plain arg-max every greedy request shares, in one run.

Run: ``python bench/bench_sampling.py`` (torch; one CPU thread).

A batch of 8 rows of SmolLM2's vocabulary (49,152 ids) is sampled as the torch executor samples
it after the LM head: the greedy rows in one arg-max, every other row by its own
``RequestSampler``. The logits are seeded normals scaled by 3, flatter than a trained model's, so
``top_p`` usually needs more than the first 256 candidates (the slow case of its partial sort).
Each row's column is its time per token and per row, and its ratio to the greedy batch's.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _harness import ns_per_op, table  # noqa: E402

from helix_async.executors.sampling import RequestSampler, sample  # noqa: E402
from helix_async.sampling import SamplingParams  # noqa: E402

VOCAB = 49_152
BATCH = 8


def main() -> None:
    torch.set_num_threads(1)
    logits = torch.randn(BATCH, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    prompt = list(range(100, 400))
    kinds: list[tuple[str, SamplingParams | None, bool]] = [
        ("greedy (shared arg-max)", None, False),
        ("greedy + logprobs 5", SamplingParams(logprobs=5), False),
        ("greedy + repetition penalty (300-token prompt)", SamplingParams(repetition_penalty=1.1), True),
        ("temperature 0.8", SamplingParams(temperature=0.8, seed=1), False),
        ("temperature 0.8, top_k 50", SamplingParams(temperature=0.8, top_k=50, seed=1), False),
        ("temperature 0.8, top_p 0.95", SamplingParams(temperature=0.8, top_p=0.95, seed=1), False),
        ("every field, logprobs 5", SamplingParams(temperature=0.8, top_k=50, top_p=0.95, min_p=0.05,
                                                   repetition_penalty=1.1, presence_penalty=0.5,
                                                   frequency_penalty=0.5, min_tokens=10**6, stop_token_ids=(2,),
                                                   logprobs=5, seed=1), True),
    ]
    rows = []
    base = 0.0
    for name, params, history in kinds:
        samplers = [None if params is None else RequestSampler(params, VOCAB, context=prompt if history else ())
                    for _ in range(BATCH)]
        ns = ns_per_op(lambda samplers=samplers: sample(logits, samplers), BATCH, repeat=3, min_time=0.3)
        base = base or ns
        rows.append((name, f"{ns / 1e3:.0f}", f"{ns / base:.1f}x"))
    print(f"sampling a batch of {BATCH} rows of {VOCAB} logits, one CPU thread")
    print(table(rows, ("request", "us per token", "vs greedy")))


if __name__ == "__main__":
    main()
