"""``python -m helix_async bench-serve``: load an OpenAI-compatible endpoint and measure it, as vLLM's
serving benchmark does.

Requests arrive as a Poisson process of ``--rate`` requests/s for ``--duration`` s (seeded), their
prompt and output lengths drawn from a length dataset (``azure-conv``, ``sharegpt``, ...); or at
the times and lengths of a trace CSV (``arrive_time_s,input_tokens,output_tokens``).  Each request
is a streaming ``/v1/completions`` call whose prompt is a list of random token ids (seeded, below
2048: valid for every model we serve) of the drawn length, with ``max_tokens`` the drawn output
length and ``ignore_eos`` (so lengths are what was asked).  A request whose prompt plus output
exceeds the server's ``max_model_len`` has its prompt shortened to fit (counted).

Per request: TTFT (sent to the first chunk), TPOT ((last - first chunk) / (tokens - 1), tokens as
the server's usage counts them), the gaps between chunks (ITL; the server sends one chunk per
token) and end-to-end latency.  Printed: the request and token throughput over the run, and mean/p50/p90/p99 of each latency; ``--json`` writes everything, and ``--save-trace`` the
trace actually sent (arrival times relative to the first request), which ``python -m sim run
--trace`` replays for a like-for-like prediction.  A failed request (HTTP error, an error event) is
counted with its status and does not stop the run.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..aio import run
from ..errors import ConfigError
from ..fileio import atomic_write_text

__all__ = ["RequestResult", "build_requests", "run_bench", "summarise"]

PROMPT_ID_RANGE = (3, 2048)


@dataclass
class RequestResult:
    sent_at: float  # seconds from the start of the run
    input_tokens: int
    output_tokens: int  # asked for
    ok: bool = False
    status: int = 0
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    tokens: int = 0  # received
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float:
        return (self.latency - self.ttft) / (self.tokens - 1) if self.tokens > 1 else 0.0


def build_requests(lengths: str, rate: float, duration: float, seed: int) -> list[tuple[float, int, int]]:
    """(arrival s, input tokens, output tokens): Poisson arrivals and dataset lengths, or a trace CSV."""
    from ..workloads import LENGTH_DATASETS, LengthSampler, read_trace_csv

    if lengths not in LENGTH_DATASETS:
        if not Path(lengths).is_file():
            raise ConfigError("<argument>", "--lengths", f"neither a length dataset ({', '.join(LENGTH_DATASETS)}) "
                              f"nor a trace file: {lengths!r}")
        return [(float(t), int(n), int(m)) for t, n, m in read_trace_csv(lengths)]
    rng = random.Random(seed)
    sampler = LengthSampler(lengths, rng)
    out = []
    t = rng.expovariate(rate)
    while t < duration:
        n, m = sampler.sample()
        out.append((t, n, m))
        t += rng.expovariate(rate)
    return out


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarise(results: list[RequestResult], span: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.tokens for r in ok)
    in_tokens = sum(r.input_tokens for r in ok)
    s: dict[str, Any] = {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "failures_by_status": {},
        "duration_s": span,
        "request_throughput": len(ok) / span if span > 0 else 0.0,
        "output_token_throughput": out_tokens / span if span > 0 else 0.0,
        "total_token_throughput": (out_tokens + in_tokens) / span if span > 0 else 0.0,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
    }
    for r in results:
        if not r.ok:
            s["failures_by_status"][str(r.status)] = s["failures_by_status"].get(str(r.status), 0) + 1
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [r.tpot for r in ok if r.tokens > 1],
        "itl": [x for r in ok for x in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for k, xs in series.items():
        s[f"mean_{k}_s"] = sum(xs) / len(xs) if xs else float("nan")
        for p in (50, 90, 99):
            s[f"p{p}_{k}_s"] = _pct(xs, p / 100)
    return s


async def _one(session: Any, url: str, model: str | None, r: RequestResult, prompt: list[int],
               api_key: str | None) -> None:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": r.output_tokens, "temperature": 0.0, "stream": True,
                            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.perf_counter()
    last = start
    chunks = 0
    usage = -1
    try:
        async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
            r.status = resp.status
            if resp.status != 200:
                try:
                    r.error = (await resp.json())["error"]["message"]
                except Exception:  # not our error shape: keep the status only
                    r.error = resp.reason or ""
                return
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    r.error = msg["error"].get("message", "error")
                    r.status = 500
                    return
                if msg.get("usage"):
                    usage = int(msg["usage"]["completion_tokens"])
                if msg.get("choices"):  # one chunk per token, the last with its finish reason
                    now = time.perf_counter()
                    if chunks == 0:
                        r.ttft = now - start
                    else:
                        r.itl.append(now - last)
                    last = now
                    chunks += 1
        r.latency = last - start
        # tokens as the server's usage counts them; chunks where it reports none
        r.tokens = usage if usage >= 0 else chunks
        r.ok = chunks > 0
    except Exception as e:  # a connection error fails this request alone
        r.error = f"{type(e).__name__}: {e}"


async def run_bench(url: str, requests: list[tuple[float, int, int]], *, seed: int = 0, model: str | None = None,
                    api_key: str | None = None, progress: bool = False, timeout_s: float = 3600.0) -> tuple[list[RequestResult], float, dict[str, Any]]:
    """Send ``requests`` at their times; returns the results, the span (s) and facts about the run."""
    import aiohttp

    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    rng = random.Random(seed + 1)
    facts: dict[str, Any] = {"clipped_prompts": 0}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        async with session.get(url + "/v1/models", headers=headers) as resp:
            if resp.status != 200:
                raise ConfigError("<argument>", "--url", f"{url}/v1/models answered {resp.status}")
            models = (await resp.json())["data"]
        served = models[0]
        model = model or served["id"]
        max_len = int(served.get("max_model_len", 1 << 30))
        facts.update(model=model, max_model_len=max_len)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(requests), unit="req", desc="bench-serve", leave=False)
        results: list[RequestResult] = []
        tasks = []
        t0 = time.perf_counter()
        for t, n, m in requests:
            m = max(1, min(m, max_len - 1))
            if n + m > max_len:
                n = max_len - m
                facts["clipped_prompts"] += 1
            prompt = [rng.randrange(*PROMPT_ID_RANGE) for _ in range(n)]
            delay = t0 + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            r = RequestResult(sent_at=time.perf_counter() - t0, input_tokens=n, output_tokens=m)
            results.append(r)
            task = asyncio.ensure_future(_one(session, url, model, r, prompt, api_key))
            if bar is not None:
                task.add_done_callback(lambda _t: bar.update(1))
            tasks.append(task)
        await asyncio.gather(*tasks)
        span = time.perf_counter() - t0
        if bar is not None:
            bar.close()
    return results, span, facts


def format_summary(s: dict[str, Any]) -> list[str]:
    lines = [
        f"{'successful requests':<34}{s['completed']:>12}",
        f"{'failed requests':<34}{s['failed']:>12}" + (f"  {s['failures_by_status']}" if s["failed"] else ""),
        f"{'duration (s)':<34}{s['duration_s']:>12.2f}",
        f"{'input tokens':<34}{s['input_tokens']:>12}",
        f"{'output tokens':<34}{s['output_tokens']:>12}",
        f"{'request throughput (req/s)':<34}{s['request_throughput']:>12.3f}",
        f"{'output token throughput (tok/s)':<34}{s['output_token_throughput']:>12.2f}",
        f"{'total token throughput (tok/s)':<34}{s['total_token_throughput']:>12.2f}",
    ]
    for k, name in (("ttft", "time to first token"), ("tpot", "time per output token"), ("itl", "inter-token latency"),
                    ("e2el", "end-to-end latency")):
        lines.append(f"{name + ' (ms)':<34}" + "".join(
            f"{lab} {1000 * s[f'{lab}_{k}_s']:>9.2f}  " for lab in ("mean", "p50", "p90", "p99")))
    return lines


def cmd_bench_serve(args: Any) -> int:
    from ..extras import require

    require("aiohttp", "serve")
    if not args.url.startswith(("http://", "https://")):
        raise ConfigError("<argument>", "--url", f"expected http://HOST:PORT, got {args.url!r}")
    requests = build_requests(args.lengths, args.rate, args.duration, args.seed)
    if not requests:
        raise ConfigError("<argument>", "--rate", "no request arrives within --duration at this rate")
    if args.save_trace:
        from ..workloads import write_trace_csv

        base = requests[0][0]
        write_trace_csv(args.save_trace, [(t - base, n, m) for t, n, m in requests])
    results, span, facts = run(run_bench(args.url, requests, seed=args.seed, model=args.model, api_key=args.api_key,
                                         progress=args.progress))
    s = summarise(results, span)
    s.update(facts, url=args.url, lengths=args.lengths, rate=args.rate, seed=args.seed)
    print(f"bench-serve: {len(requests)} requests to {args.url} ({args.lengths}, "
          + (f"Poisson {args.rate:g} req/s" if Path(args.lengths).suffix != ".csv" else "trace times") + ")")
    if facts["clipped_prompts"]:
        print(f"  ({facts['clipped_prompts']} prompts shortened to fit max_model_len {facts['max_model_len']})")
    for line in format_summary(s):
        print("  " + line)
    if args.json:
        out = dict(s, requests_detail=[{k: v for k, v in asdict(r).items() if k != "itl"} for r in results])
        atomic_write_text(args.json, json.dumps(out, indent=1) + "\n", "result file", flag="--json")
        print(f"result written to {args.json}")
    return 0


def add_parser(sub: Any, positive: Any) -> None:
    from ..cli.args import number_in, output_file, seed

    b = sub.add_parser("bench-serve", help="load an OpenAI-compatible endpoint and report throughput and latency")
    b.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    # bounded so that the requests, built before the first is sent, stay a few million at most
    b.add_argument("--rate", type=number_in(0.0, 1000.0, low_open=True, unit="requests/s"), default=1.0,
                   help="Poisson arrivals, requests/s, at most 1000 (default %(default)s)")
    b.add_argument("--duration", type=number_in(0.0, 3600.0, low_open=True, unit="s"), default=60.0,
                   help="seconds of arrivals, at most 3600 (default %(default)s)")
    b.add_argument("--lengths", default="azure-conv",
                   help="length dataset (azure-conv, azure-code, alpaca, sharegpt) or a trace CSV (default %(default)s)")
    b.add_argument("--seed", type=seed, default=0, help="seed of arrivals, lengths and prompt ids (default %(default)s)")
    b.add_argument("--model", default=None, help="model id (default: the server's)")
    b.add_argument("--api-key", default=None, help="bearer token")
    b.add_argument("--json", default=None, type=output_file, help="write the result (and every request) here")
    b.add_argument("--save-trace", default=None, help="write the trace sent (for python -m sim run --trace)")
    b.add_argument("--progress", action="store_true", help="a progress bar (stderr)")
    b.set_defaults(handler=cmd_bench_serve)
