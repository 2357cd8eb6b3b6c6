"""A served run's logs (the original's events.txt and query_route.txt, plus JSON lines) and the
report read back with the original parser's definitions; figures worked out by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helix_async.errors import ConfigError
from helix_async.runlog import RunLog, read_events, summarise


def make_log() -> RunLog:
    log = RunLog(t0=100.0)
    # query 0: 5 input tokens, 3 output tokens: submitted at 1.0, tokens at 1.5, 1.75, 2.0
    log.submitted(0, 5, 3, 101.0)
    for t in (101.5, 101.75, 102.0):
        log.token(0, t)
    log.finished(0, ((0, 0, 3), (2, 3, 8)))
    # query 1: 2 input tokens, fails after its first token
    log.submitted(1, 2, 4, 101.25)
    log.token(1, 102.25)
    log.finished(1, ((1, 0, 8),), "worker 1 is lost")
    return log


def test_events_and_routes_in_the_original_formats(tmp_path: Path) -> None:
    paths = make_log().write(tmp_path)
    assert [p.name for p in paths] == ["events.txt", "query_route.txt", "requests.jsonl"]
    ev = read_events(tmp_path / "events.txt")
    assert ev == [
        (1.0, 0, "out", "prompt", 0, 6),
        (1.25, 1, "out", "prompt", 0, 3),
        (1.5, 0, "in", "prompt", 0, 6),
        (1.5, 0, "out", "decode", 6, 1),
        (1.75, 0, "in", "decode", 6, 1),
        (1.75, 0, "out", "decode", 7, 1),
        (2.0, 0, "in", "decode", 7, 1),
        (2.25, 1, "in", "prompt", 0, 3),
        (2.25, 1, "out", "decode", 3, 1),  # sent, never answered: the query failed
    ]
    routes = (tmp_path / "query_route.txt").read_text().splitlines()
    assert routes == ["(0, 5, 3, [1, 3, 0], [0, 3, -1], [3, 8, -1])", "(1, 2, 4, [2, 0], [0, -1], [8, -1])"]
    rows = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert rows[1]["error"] == "worker 1 is lost" and rows[0]["token_times"] == [1.5, 1.75, 2.0]


def test_summary_follows_the_original_parser(tmp_path: Path) -> None:
    make_log().write(tmp_path)
    ev = read_events(tmp_path / "events.txt")
    s = summarise(ev, warmup=0.0, finish=10.0)
    assert s.prompt_latency == (0.5, 1.0)  # query 0: 1.5 - 1.0; query 1: 2.25 - 1.25
    assert s.decode_latency == (0.25, 0.25)
    assert s.decode_throughput == pytest.approx(2 / (0.25 + 1e-6))  # 2 decode 'in' events over 1.75..2.0
    assert s.stats("prompt")["mean"] == 0.75 and s.stats("prompt")["p50"] == 1.0
    # the window keeps what comes *in* inside it
    s2 = summarise(ev, warmup=1.6, finish=2.1)
    assert s2.prompt_latency == () and s2.decode_latency == (0.25, 0.25)


def test_malformed_event_line_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "events.txt"
    f.write_text("(1.0, 0, 'out', 'prompt', 0, 6)\n(2.0, 0, 'sideways', 'prompt', 0, 6)\n")
    with pytest.raises(ConfigError, match=r"events.txt:2"):
        read_events(f)
    f.write_text("(1.0, 0, 'out'\n")
    with pytest.raises(ConfigError, match=r"events.txt:1"):
        read_events(f)


def test_report_command_prints_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    make_log().write(tmp_path)
    p = subprocess.run([sys.executable, "-m", "helix_async", "report", str(tmp_path), "--warmup", "0", "--plots"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "decode throughput: 8.00 tokens/s" in p.stdout
    assert (tmp_path / "throughput.png").stat().st_size > 0 and (tmp_path / "latency.png").stat().st_size > 0
    p = subprocess.run([sys.executable, "-m", "helix_async", "report", str(tmp_path / "nowhere")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "events.txt" in p.stderr


def test_profile_command_writes_the_shipped_format(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    p = subprocess.run(
        [sys.executable, "-m", "helix_async", "profile", "--model", "tiny-llama", "--repeats", "1",
         "--prompt-max-tokens", "32", "--decode-max-tokens", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr
    prompt = (tmp_path / "cpu_prompt.csv").read_text().splitlines()
    decode = (tmp_path / "cpu_decode.csv").read_text().splitlines()
    assert prompt[0] == "batch_tokens,time_per_layer_ms" and prompt[1] == "0,0"
    # the prompt grid reaches the longest input, which the throughput model looks up (docs/profiles.md)
    assert [r.split(",")[0] for r in prompt[2:]] == ["16", "32", "64", "128", "256", "512", "1024", "2048"]
    assert [r.split(",")[0] for r in decode[2:]] == ["1", "2"]
    assert all(float(r.split(",")[1]) > 0 for r in prompt[2:] + decode[2:])
    rows = (tmp_path / "node_settings.csv").read_text().splitlines()
    assert rows[0].startswith("model,gpu,max_num_layers,num_layers") and len(rows) == 1 + 8
    assert rows[8].split(",")[:4] == ["tiny_llama", "CPU", "8", "8"]
