"""A 15 MB prompt against a served cluster does not stall it (``bench/bench_big_prompt.py``).

``python -m helix_async serve --model tiny-llama --workers 3`` (3 worker processes, CURVE keys made
for the run) serves one greedy stream while big requests come, one after the other: a 15 MB text
prompt, as many bytes of token ids, the text as a chat message, and to ``/tokenize``.  Each gets
its answer or a 400 (they are all past the context), the stream's text is the same as the one of
the same request sent alone afterwards, no worker is lost, no request migrated and no link
degraded.  The stream's longest silence meanwhile is measured and reported by the bench (the
issue's target: under 1 s, against a usual TPOT of 0.01 to 0.06 s); here it is bounded generously
(5 s, on a loaded 2-core machine) so that a stall like the 11 s one of tokenizing on the event
loop fails.  The serve process is stopped at the end (killed if it does not stop).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("aiohttp")
pytest.importorskip("tokenizers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bench_big_prompt import Stream, measure, start_serve  # noqa: E402

pytestmark = pytest.mark.slow


def test_a_15_mb_prompt_is_refused_while_a_stream_goes_on_unharmed() -> None:
    with tempfile.TemporaryDirectory(prefix="test-big-prompt-") as tmp:
        proc, host, port = start_serve("tiny-llama", Path(tmp))
        try:
            out = measure(host, port, mb=15, tokens=120)
            again = Stream(host, port, {"prompt": "The planner places layers", "max_tokens": 120, "temperature": 0,
                                        "stream": True, "ignore_eos": True})
            again.run()
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    report = json.dumps(out, indent=1)
    assert out["stream_error"] == "" and out["stream_events"] == 120 + 1, report  # 120 tokens and [DONE]
    assert again.error == "" and out["stream_text"] == again.text != "", report
    for big in out["big_requests"]:
        assert big["status"] in (200, 400), report
        if big["status"] == 400:
            assert "context length" in big["answer"], report
    assert (out["workers_lost"], out["requests_migrated"], out["links_degraded"]) == (0, 0, 0), report
    assert out["longest_silence_during_big_s"] < 5.0, report
