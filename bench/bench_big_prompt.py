"""A 15 MB prompt against a served cluster: how long an in-flight stream goes silent meanwhile.

Run: ``python bench/bench_big_prompt.py [--model tiny-llama] [--mb 15] [--tokens 400] [--json OUT]``.

It starts ``python -m helix_async serve --model MODEL --workers 3`` (CURVE keys made for the run,
as serve does by default), opens one streaming completion (greedy, ``--tokens`` tokens), and once
its first tokens have come sends big requests one after the other, each on its own connection: a
text prompt of ``--mb`` MB to ``/v1/completions``, as many bytes of token ids there, the same
text as a chat message to ``/v1/chat/completions``, and to ``/tokenize``.  The stream is read in a thread of its own with
blocking reads, each event stamped as it arrives; reported:

- the stream's longest silence while the big requests were being sent and answered, and over the
  whole stream, against its median gap between tokens (its usual TPOT);
- each big request's status and how long its answer took;
- from ``/metrics`` afterwards: workers lost, requests migrated and links degraded (all should be 0).

The issue's targets: the longest silence under 1 s, nothing lost or degraded, the big request
answered or refused with a 400.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Stream:
    """One streaming completion read in a thread: ``stamps`` (perf_counter) of its events."""

    host: str
    port: int
    body: dict[str, Any]
    stamps: list[float] = field(default_factory=list)
    text: str = ""
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            c = http.client.HTTPConnection(self.host, self.port, timeout=300)
            c.request("POST", "/v1/completions", json.dumps(self.body), {"Content-Type": "application/json"})
            r = c.getresponse()
            if r.status != 200:
                self.error = f"status {r.status}: {r.read()[:200]!r}"
                return
            while True:
                line = r.fp.readline()
                if not line:
                    break
                if line.startswith(b"data: "):
                    self.stamps.append(time.perf_counter())
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        break
                    ev = json.loads(data)
                    if "error" in ev:
                        self.error = str(ev["error"])
                    else:
                        self.text += ev["choices"][0]["text"]
            c.close()
        except Exception as e:  # reported, not raised: the measurement says what happened
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.done.set()


def post(host: str, port: int, path: str, body: bytes) -> tuple[int, str, float]:
    """(status, the answer's first 200 characters, seconds from sending to the whole answer)."""
    t0 = time.perf_counter()
    c = http.client.HTTPConnection(host, port, timeout=600)
    try:
        c.request("POST", path, body, {"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        return r.status, data[:200].decode("utf-8", "replace"), time.perf_counter() - t0
    finally:
        c.close()


def metrics(host: str, port: int) -> dict[str, float]:
    c = http.client.HTTPConnection(host, port, timeout=30)
    try:
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
    finally:
        c.close()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def big_text(mb: float) -> str:
    """``mb`` MB of prose (this repository's docs, repeated)."""
    src = "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    n = int(mb * 1_000_000)
    return (src * (n // len(src) + 1))[:n]


def longest_gap(stamps: list[float], start: float, end: float) -> float:
    """The longest time between consecutive events, or between ``start``/``end`` and the nearest
    event, within [start, end]."""
    inside = [t for t in stamps if start <= t <= end]
    points = [start, *inside, end]
    before = [t for t in stamps if t < start]
    if before:
        points[0] = before[-1]
    after = [t for t in stamps if t > end]
    if after:
        points[-1] = after[0]
    return max(b - a for a, b in zip(points, points[1:], strict=False))


def start_serve(model: str, log_dir: Path) -> tuple[subprocess.Popen[bytes], str, int]:
    url_file = log_dir / "url"
    with open(log_dir / "serve.err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "helix_async", "serve", "--model", model, "--workers", "3",
                                 "--http", "127.0.0.1:0", "--url-file", str(url_file), "--log-dir",
                                 str(log_dir / "logs")], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    for _ in range(6000):  # up to 10 min: the workers load their weights
        if url_file.is_file() and url_file.read_text().strip():
            break
        if proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode}: {(log_dir / 'serve.err').read_text()[-2000:]}")
        time.sleep(0.1)
    else:
        proc.kill()
        raise SystemExit("serve did not come up in 10 minutes")
    url = url_file.read_text().strip().removeprefix("http://").rstrip("/")
    host, port = url.rsplit(":", 1)
    return proc, host, int(port)


def measure(host: str, port: int, *, mb: float, tokens: int, chat: bool = True, ids: bool = True) -> dict[str, Any]:
    text = big_text(mb)
    bodies = [("/v1/completions", json.dumps({"prompt": text, "max_tokens": 4}).encode())]
    if ids:  # as many bytes of token ids (a JSON list of about 2.5 million numbers)
        n = int(mb * 1_000_000) // 6
        bodies.append(("/v1/completions", json.dumps({"prompt": [1000 + i % 1000 for i in range(n)],
                                                      "max_tokens": 4}).encode()))
    if chat:
        bodies.append(("/v1/chat/completions",
                       json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 4}).encode()))
        bodies.append(("/tokenize", json.dumps({"prompt": text}).encode()))
    stream = Stream(host, port, {"prompt": "The planner places layers", "max_tokens": tokens, "temperature": 0,
                                 "stream": True, "ignore_eos": True})
    th = threading.Thread(target=stream.run, daemon=True)
    th.start()
    for _ in range(3000):  # the stream's first tokens (bounded: 5 min)
        if len(stream.stamps) >= 5 or stream.done.is_set():
            break
        time.sleep(0.1)
    big: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    windows = []
    for path, body in bodies:
        t0 = time.perf_counter()
        status, answer, took = post(host, port, path, body)
        windows.append((t0, time.perf_counter()))
        big.append({"path": path, "bytes": len(body), "status": status, "seconds": round(took, 3),
                    "answer": answer[:160]})
    t_end = time.perf_counter()
    stream.done.wait(600)
    th.join(10)
    for b, (a, z) in zip(big, windows, strict=True):
        b["longest_silence_s"] = round(longest_gap(stream.stamps, a, z), 4)
    gaps = [b - a for a, b in zip(stream.stamps, stream.stamps[1:], strict=False)]
    m = metrics(host, port)
    degraded = sum(v for k, v in m.items() if k.startswith("helix_link_degraded"))
    return {
        "stream_events": len(stream.stamps),
        "stream_error": stream.error,
        "stream_text": stream.text,
        "tpot_median_s": round(statistics.median(gaps), 4) if gaps else None,
        "longest_silence_during_big_s": round(longest_gap(stream.stamps, t_start, t_end), 4),
        "longest_silence_whole_stream_s": round(max(gaps), 4) if gaps else None,
        "stream_ended_after_big": bool(stream.stamps) and stream.stamps[-1] > t_end,
        "big_requests": big,
        "workers_lost": m["helix_workers_lost_total"],
        "requests_migrated": m["helix_requests_migrated_total"],
        "links_degraded": degraded,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama", help="what serve serves (default tiny-llama)")
    ap.add_argument("--mb", type=float, default=15.0, help="the big prompt's size, MB (default 15)")
    ap.add_argument("--tokens", type=int, default=400, help="the stream's tokens (default 400)")
    ap.add_argument("--url", help="measure against this running server (HOST:PORT) instead of starting serve")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    proc = None
    with tempfile.TemporaryDirectory(prefix="bench-big-prompt-") as tmp:
        try:
            if args.url:
                host, port_text = args.url.removeprefix("http://").rstrip("/").rsplit(":", 1)
                port = int(port_text)
            else:
                proc, host, port = start_serve(args.model, Path(tmp))
            out = measure(host, port, mb=args.mb, tokens=args.tokens)
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    out.update(model=args.model, mb=args.mb)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
