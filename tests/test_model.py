"""Typical-batch throughput model and max compute throughput against the original Helix code's outputs.

Oracles: helix_async/data/derived/*.csv were produced by running the unmodified Helix code
(see data/PROVENANCE.md); the spot values are quoted in docs/original.md §3.4–3.5.
"""

from __future__ import annotations

import csv
from importlib import resources

import pytest

from helix_async.errors import ConfigError
from helix_async.model import (
    ThroughputModel,
    check_fits,
    get_model,
    kv_capacity,
    load_profiles,
    max_compute_throughput,
)

DERIVED = resources.files("helix_async") / "data" / "derived"
MIXES = {
    "M24": {"A100": 4, "L4": 8, "T4": 12},
    "M42": {"A100": 4, "V100": 6, "L4": 8, "L4x2": 4, "T4": 10, "T4x2": 6, "T4x4": 4},
    "A100x4": {"A100": 4},
    "L4x8": {"L4": 8},
    "T4x12": {"T4": 12},
    "L4x4_T4x6": {"L4": 4, "T4": 6},
}
REL = 1e-6


def _rows(name: str) -> list[dict[str, str]]:
    with (DERIVED / name).open() as fh:
        return list(csv.DictReader(fh))


def _model(cache: dict, model: str, mix: str) -> ThroughputModel:
    key = (model, mix)
    if key not in cache:
        cache[key] = ThroughputModel(model, MIXES[mix])
    return cache[key]


def test_typical_throughput_table_matches_original() -> None:
    cache: dict = {}
    rows = _rows("typical_throughput.csv")
    assert len(rows) == 204
    for r in rows:
        tm = _model(cache, r["model"], r["machine_num_scenario"])
        tb = tm.typical_batch(r["gpu"], int(r["num_layers"]))
        where = f"{r['model']}/{r['machine_num_scenario']}/{r['gpu']}/k={r['num_layers']}"
        assert tb.workload_ratio == pytest.approx(float(r["workload_ratio"]), rel=REL), where
        assert tb.prompt_requests == pytest.approx(float(r["prompt_typical_requests"]), rel=REL), where
        assert tb.prompt_tokens == int(r["prompt_typical_tokens"]), where
        assert tb.decode_tokens == int(r["decode_typical_tokens"]), where
        assert tb.throughput == pytest.approx(float(r["typical_token_throughput_tok_per_s"]), rel=REL), where
        assert kv_capacity(r["model"], r["gpu"], int(r["num_layers"])) == int(r["kv_cache_capacity_token_layers"])


def test_normalized_perf_matches_original() -> None:
    cache: dict = {}
    for r in _rows("normalized_perf.csv"):
        tm = _model(cache, r["model"], r["machine_num_scenario"])
        assert tm.typical_layers[r["gpu"]] == int(r["typical_layers"])
        assert tm.normalized_perf[r["gpu"]] == pytest.approx(float(r["normalized_perf_after_10_iters"]), rel=REL)


def test_worked_example_a100_eight_layers_single24() -> None:
    tm = ThroughputModel("llama2-70b", MIXES["M24"])
    tb = tm.typical_batch("A100", 8)
    assert (tb.prompt_tokens, tb.decode_tokens) == (19, 6)
    assert tb.throughput == pytest.approx(2045.64, abs=0.005)


@pytest.mark.parametrize(
    ("cluster", "model", "expected"),
    [
        ("single24", "llama2-70b", 2803.86),
        ("3cluster24", "llama2-70b", 2803.86),
        ("cluster42", "llama2-70b", 7104.26),
        ("single24", "llama1-30b", 1755.01),
        ("3cluster24", "llama1-30b", 1755.01),
        ("single_a100", "llama1-30b", 1628.18),
        ("single_l4", "llama1-30b", 357.24),
        ("single_t4", "llama1-30b", 397.69),
        ("cluster10", "llama1-30b", 364.51),
    ],
)
def test_max_compute_throughput(cluster: str, model: str, expected: float) -> None:
    from helix_async.cluster import load_cluster

    assert max_compute_throughput(load_cluster(cluster), model) == pytest.approx(expected, abs=0.006)


def test_max_compute_throughput_single24_full_precision() -> None:
    from helix_async.cluster import load_cluster

    summary = {r["layout"]: r for r in _rows("layout_summary.csv")}
    expected = float(summary["single24_llama70b/ilp"]["max_compute_throughput_tok_per_s"])
    assert max_compute_throughput(load_cluster("single24"), "llama2-70b") == pytest.approx(expected, rel=1e-12)


def test_models_and_aliases() -> None:
    m = get_model("LLaMA2_70B")
    assert (m.name, m.num_layers, m.hidden_size, m.activation_size) == ("llama2-70b", 80, 8192, 16384)
    assert get_model("llama1-30b").num_layers == 60
    tiny = get_model("tiny-llama")
    assert tiny.num_layers == 8 and tiny.hidden_size == 256 and tiny.activation_size == 1024
    with pytest.raises(ConfigError, match="gpt-5.*neither a known"):
        get_model("gpt-5")


def test_node_settings_and_profiles() -> None:
    ps = load_profiles("llama2-70b")
    a100 = ps.node_settings("A100")
    assert a100.max_layers == 12
    assert a100.kv(8) == 16 * 39442 * 8
    assert a100.prompt_limit_tokens(1) == 6144
    assert a100.decode_limit_tokens(12) == 300
    with pytest.raises(ValueError, match="1..12"):
        a100.kv(13)
    t4 = ps.profile("T4")
    assert t4.batch_time(0, 0) == 0.0
    assert t4.batch_time(250, 2) == t4.prompt(250) + t4.decode(2)
    with pytest.raises(ConfigError, match="no layer profile for GPU 'B300'"):
        ps.profile("B300")


def test_too_small_cluster_is_rejected() -> None:
    from helix_async.cluster import load_cluster

    t4 = load_cluster("single_t4").subcluster(range(3))
    with pytest.raises(ConfigError, match="needs 80 layers but the cluster's nodes hold at most 12"):
        check_fits(t4, "llama2-70b")
    check_fits(load_cluster("single24"), "llama2-70b")


def test_forced_throughput_does_not_leak_into_unforced_lookups() -> None:
    tm = ThroughputModel("llama2-70b", MIXES["M24"])
    assert tm.throughput("A100", 20, exceed_profiled_max=True) > 0
    with pytest.raises(ValueError, match="1..12"):
        tm.throughput("A100", 20)
    assert tm.throughput("a100", 8) == tm.throughput("A100", 8)  # case-insensitive, same cache entry
