"""The runtime host's settings and its side of the serving-host protocol, without any worker.

* ``HostSettings`` owns the host's defaults: the ``host`` command's flags default to them, so a
  command line without flags builds exactly ``HostSettings()``; a value out of range names its
  field (and, from the command line, its flag).
* A ``HostServer`` that no worker has joined yet answers the front door's questions: not ready,
  its workers down, the plan's flow shares in its snapshot, which ``Metrics`` renders.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import pytest

pytest.importorskip("zmq")

from helix_async.cluster import load_cluster  # noqa: E402
from helix_async.errors import ConfigError, RequestFailed  # noqa: E402
from helix_async.placement import Placement  # noqa: E402
from helix_async.runtime.commands import add_parsers, host_settings  # noqa: E402
from helix_async.runtime.host_main import HostServer  # noqa: E402
from helix_async.settings import KV_ONLINE, HostSettings, KVExpectation  # noqa: E402

STAGES = {0: (0, 3), 1: (3, 6), 2: (6, 8)}


def _parser() -> argparse.ArgumentParser:
    def positive(text: str) -> float:
        v = float(text)
        if v <= 0:
            raise argparse.ArgumentTypeError("must be > 0")
        return v

    def pair(text: str) -> tuple[float, float]:
        a, b = text.split(",")
        return float(a), float(b)

    p = argparse.ArgumentParser()
    add_parsers(p.add_subparsers(dest="command"), lambda t: int(positive(t)), positive, pair)
    return p


def test_the_host_commands_flags_default_to_the_settings_own() -> None:
    args = _parser().parse_args(["host", "--plan", "p.toml"])
    assert host_settings(args) == HostSettings()
    assert HostSettings().kv == KV_ONLINE


def test_the_host_commands_flags_set_the_settings() -> None:
    args = _parser().parse_args(["host", "--plan", "p.toml", "--listen", "tcp://0.0.0.0:5555", "--kv", "0.8,0.5",
                                 "--admission-capacity", "12", "--log-dir", "out", "--emulate", "2",
                                 "--recovery-timeout", "7", "--grace", "3"])
    assert host_settings(args) == HostSettings(listen="tcp://0.0.0.0:5555", kv=KVExpectation(0.8, 0.5),
                                               admission_capacity=12, log_dir="out", emulate_time_scale=2.0,
                                               recovery_timeout=7.0, shutdown_grace=3.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [("admission_capacity", 0), ("recovery_timeout", -1.0), ("slow_link_rtt", 0.0), ("lossy_link_retries", 0),
     ("link_recover_s", 0.0), ("emulate_time_scale", 0.0), ("link_degrade_factor", 1.5),
     ("link_degrade_factor", 0.0), ("shutdown_grace", -0.5)],
)
def test_a_setting_out_of_range_names_its_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field) as e:
        HostSettings(**{field: value})
    assert e.value.field == field


def test_from_the_command_line_the_error_names_the_flag() -> None:
    args = _parser().parse_args(["host", "--plan", "p.toml"])
    args.admission_capacity = 0  # (argparse's own check refuses it first; the mapping is what is checked)
    with pytest.raises(ConfigError, match="--admission-capacity: must be > 0"):
        host_settings(args)


@pytest.mark.parametrize(
    ("scheduler", "match"),
    [("shortest-queue", "--scheduler: shortest-queue runs only in the simulator: .*the runtime runs: maxflow"),
     ("random", "--scheduler: random runs only in the simulator"),
     ("bogus", "--scheduler: unknown scheduler 'bogus'; known: maxflow, swarm")],
)
def test_the_host_refuses_a_scheduler_it_cannot_run_before_it_starts(scheduler: str, match: str) -> None:
    args = _parser().parse_args(["host", "--plan", "p.toml", "--scheduler", scheduler])
    settings = host_settings(args)
    assert settings.scheduler == scheduler
    placement = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", STAGES)
    with pytest.raises(ConfigError, match=match):
        HostServer(placement, settings=settings)


def test_a_host_without_workers_answers_the_front_doors_questions() -> None:
    pytest.importorskip("prometheus_client")
    from helix_async.frontend.metrics import Metrics

    placement = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", STAGES)

    async def main() -> dict[str, Any]:
        server = HostServer(placement, settings=HostSettings(admission_capacity=3))
        await server.start()
        try:
            out: dict[str, Any] = {"ready": server.ready, "overloaded": server.overloaded,
                                   "capacity": server.admission_capacity, "vocab": server.vocab_size,
                                   "workers": server.workers, "snapshot": server.snapshot(),
                                   "flow": server.flow.value}
            out["metrics"] = Metrics(server).render()[0].decode()
            try:
                async for _ in server.generate([1, 2], 3):
                    pass
            except RequestFailed as e:
                out["refused"] = (e.kind, str(e))
            return out
        finally:
            await server.shutdown("test done", grace=0.0)

    out = asyncio.run(main())
    assert (out["ready"], out["overloaded"], out["capacity"], out["vocab"], out["workers"]) == (False, False, 3, 2048, 3)
    assert out["refused"] == ("unavailable", "the host is not serving yet")
    snap = out["snapshot"]
    assert [(n.node, n.up, n.report_age) for n in snap.nodes] == [(0, False, None), (1, False, None), (2, False, None)]
    assert (snap.waiting, snap.active, snap.links, snap.admission_stopped) == (0, 0, (), False)
    # a chain: every link carries the whole flow, from the host's send side to its receive side
    assert set(snap.plan_flows) == {("host", "0"), ("0", "1"), ("1", "2"), ("2", "host")}
    assert all(f == pytest.approx(out["flow"]) for f in snap.plan_flows.values())
    assert 'helix_link_flow_share{dst="2",kind="plan",src="1"} 1.0' in out["metrics"]
    assert 'helix_worker_up{node="0"} 0.0' in out["metrics"]

