"""Faults in virtual time: kill (and revive) nodes through the host's own recovery path.

``--faults "node=7@t=120s,node=3@t=300s+60s"``: node 7 dies 120 s after the models are loaded
(the clock of ``--warmup``) and stays dead; node 3 dies at 300 s and is back 60 s later (the down
time includes reloading its layers).  A fault:

1. at ``t``: the worker crashes (``Worker.kill``: what it was running is lost, it sends nothing)
   and its network endpoint is detached (messages to it are dropped);
2. ``detect_after`` seconds later (1.5 s: the runtime transport's silence limit): the host learns
   it, as the runtime's host does from its heartbeats, re-plans max flow without the node
   (``roles.Replanner``) and calls ``Host.replan``, which migrates the queries whose route crossed
   it (their context re-run as a prompt on a new route) or stops admission when a layer has no
   live node left;
3. at ``t + down``: a fresh worker with the node's role (empty KV, no requests) takes its place
   and the host re-plans with it.

This is the same host code the runtime runs; only the detection (a timer instead of heartbeats)
and the crash (an object instead of a process) are the simulator's.

The report gets one entry per fault: decode tokens/s and decode latency in the ``window`` seconds
before the kill, between the kill and the revival (or ``window`` s after the kill), and in the
``window`` s after the revival; the queries migrated; and the time to recover: from the kill until
every migrated query has produced a token again.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from helix_async.errors import ConfigError
from helix_async.fileio import short_repr
from helix_async.roles import Replanner
from helix_async.routing.policies import POLICIES

__all__ = ["DETECT_AFTER_S", "Fault", "FaultInjector", "parse_faults"]

#: seconds from a crash to the host's knowing it (the runtime transport reports a silent peer
#: after 1.5 s without an answer; its heartbeats go every 0.25 s)
DETECT_AFTER_S = 1.5

_ITEM = re.compile(r"^node=(\d+)@t=(\d+(?:\.\d*)?)s?(?:\+(\d+(?:\.\d*)?)s?)?$")
#: The largest node id and the latest time (seconds after the models load) a fault may name: node
#: ids fit a C int (cluster files number nodes 0..n-1), times one simulated day (the runner's
#: ``MAX_SIM_SECONDS``). Checked on the digits before any conversion, so a 5,000-digit id is one line.
MAX_FAULT_NODE = 2**31 - 1
MAX_FAULT_SECONDS = 86_400.0


@dataclass(frozen=True)
class Fault:
    node: int
    at: float  # seconds after the models are loaded
    down_for: float | None = None  # None: the node stays dead


def parse_faults(text: str, nodes: Sequence[int] | None = None, where: str = "--faults") -> list[Fault]:
    """``node=N@t=Ts[+Ds]`` items, comma-separated (see the module doc)."""
    out: list[Fault] = []
    for raw in text.split(","):
        item = raw.strip().replace(" ", "")
        if not item:
            continue
        m = _ITEM.match(item)
        if m is None:
            raise ConfigError("<argument>", where, f"bad fault {short_repr(raw.strip())}: expected node=N@t=SECONDSs or "
                              "node=N@t=SECONDSs+DOWNs, e.g. node=7@t=120s,node=3@t=300s+60s")
        if len(m.group(1)) > 10 or int(m.group(1)) > MAX_FAULT_NODE:
            raise ConfigError("<argument>", where, f"bad fault {short_repr(raw.strip())}: node ids go up to {MAX_FAULT_NODE}")
        for g in (m.group(2), m.group(3)):
            if g is not None and (len(g) > 20 or float(g) > MAX_FAULT_SECONDS):
                raise ConfigError("<argument>", where, f"bad fault {short_repr(raw.strip())}: times go up to "
                                  f"{MAX_FAULT_SECONDS:g} s (one simulated day)")
        node, at = int(m.group(1)), float(m.group(2))
        down = float(m.group(3)) if m.group(3) is not None else None
        if nodes is not None and node not in nodes:
            raise ConfigError("<argument>", where, f"node {node} holds no layers in this plan (its nodes: {sorted(nodes)})")
        if down is not None and down <= 0:
            raise ConfigError("<argument>", where, f"bad fault {item!r}: the down time must be > 0")
        out.append(Fault(node, at, down))
    if not out:
        raise ConfigError("<argument>", where, "no fault given")
    seen: dict[int, list[tuple[float, float]]] = {}
    for f in out:
        end = f.at + f.down_for if f.down_for is not None else float("inf")
        for a, b in seen.get(f.node, []):
            if f.at < b and a < end:
                raise ConfigError("<argument>", where, f"node {f.node}'s faults overlap in time")
        seen.setdefault(f.node, []).append((f.at, end))
    return out


class FaultInjector:
    """Schedules ``faults`` on a :class:`~sim.simulation.Simulation` (see the module doc)."""

    def __init__(self, sim: Any, faults: Sequence[Fault], *, detect_after: float = DETECT_AFTER_S) -> None:
        if not sim.policy.routes_at_admission:
            able = ", ".join(p.name for p in POLICIES.values() if p.routes_at_admission)
            raise ConfigError("<argument>", "--faults", f"fault recovery re-plans MaxFlow's flows: use --scheduler {able}")
        self.sim = sim
        self.faults = list(faults)
        self.detect_after = float(detect_after)
        self.replanner = Replanner(sim.placement, sim.setup.kv, sim.tm, policy=sim.policy)
        self.lost: set[int] = set()
        self.records: list[dict[str, Any]] = [
            {"node": f.node, "killed_at": sim.t0 + f.at, "detected_at": None, "revived_at": None,
             "down_for": f.down_for, "migrated": [], "admission_stopped": ""}
            for f in self.faults
        ]

    def install(self) -> None:
        clock = self.sim.clock
        for k, f in enumerate(self.faults):
            clock.call_at(self.sim.t0 + f.at, self._kill, k)

    def _kill(self, k: int) -> None:
        f = self.faults[k]
        sim = self.sim
        sim.workers[f.node].kill()
        sim.network.detach(f.node)
        self.lost.add(f.node)
        clock = sim.clock
        clock.call_at(clock.now() + self.detect_after, self._detect, k)
        if f.down_for is not None:
            clock.call_at(clock.now() + f.down_for, self._revive, k)

    def _replan(self) -> tuple[list[int], str]:
        router, _flow, reason = self.replanner.router(frozenset(self.lost))
        return self.sim.host.replan(router, self.lost, reason), reason

    def _detect(self, k: int) -> None:
        rec = self.records[k]
        if self.faults[k].node not in self.lost:  # back before anyone noticed
            return
        rec["detected_at"] = self.sim.clock.now()
        moved, reason = self._replan()
        rec["migrated"] = moved
        rec["admission_stopped"] = reason

    def _revive(self, k: int) -> None:
        node = self.faults[k].node
        self.sim.revive_worker(node)
        self.lost.discard(node)
        self.records[k]["revived_at"] = self.sim.clock.now()
        self._replan()

    def summary(self, window: float = 60.0) -> list[dict[str, Any]]:
        """Per fault: throughput and latency around it, migrations, time to recover (see the module doc)."""
        host = self.sim.host
        done = np.frombuffer(host.decode_done, dtype=float) if len(host.decode_done) else np.zeros(0)
        lat = np.frombuffer(host.decode_latency, dtype=float) if len(host.decode_latency) else np.zeros(0)
        resumed = {(qid, at): t for qid, at, t in host.resumed}
        out = []
        for rec in self.records:
            kill = rec["killed_at"]
            back = rec["revived_at"]
            spans = {"before": (kill - window, kill), "during": (kill, back if back is not None else kill + window)}
            # after: once it is back, or (never back) the next window, on the re-planned flows
            spans["after"] = (back, back + window) if back is not None else (kill + window, kill + 2 * window)
            figures = {}
            for name, (a, b) in spans.items():
                sel = (done >= a) & (done < b)
                n = int(sel.sum())
                figures[name] = {
                    "from_s": a, "to_s": b,
                    "decode_tokens_per_s": n / (b - a) if b > a else 0.0,
                    "decode_latency_p50_s": float(np.median(lat[sel])) if n else None,
                }
            det = rec["detected_at"]
            moved = set(rec["migrated"])
            times = sorted(t - kill for (qid, at), t in resumed.items() if det is not None and at == det and qid in moved)
            recovered = times[-1] if moved and len(times) == len(moved) else None
            out.append({
                "node": rec["node"], "killed_at_s": kill, "detected_at_s": det, "revived_at_s": back,
                "migrated_queries": len(moved), "resumed_queries": len(times),
                "first_resumed_s": times[0] if times else None,
                "median_resumed_s": times[len(times) // 2] if times else None,
                "recovery_s": recovered, "admission_stopped": rec["admission_stopped"], "windows": figures,
            })
        return out


def fault_lines(summary: list[dict[str, Any]]) -> list[str]:
    lines = []
    for f in summary:
        w = f["windows"]
        parts = []
        for name in ("before", "during", "after"):
            if name in w:
                x = w[name]
                p50 = x["decode_latency_p50_s"]
                parts.append(f"{name} {x['decode_tokens_per_s']:.1f} tok/s" + (f" (p50 {p50:.3f} s)" if p50 is not None else ""))
        def s(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.2f} s"

        back = f" revived at {f['revived_at_s']:.1f} s;" if f["revived_at_s"] is not None else ""
        lines.append(f"Fault: node {f['node']} killed at {f['killed_at_s']:.1f} s;{back} {f['migrated_queries']} queries "
                     f"migrated; after the kill the first produced again at {s(f['first_resumed_s'])}, half by "
                     f"{s(f['median_resumed_s'])}, all by {s(f['recovery_s'])} ({f['resumed_queries']} resumed)")
        lines.append("  decode " + ", ".join(parts))
        if f["admission_stopped"]:
            lines.append(f"  admission stopped: {f['admission_stopped']}")
    return lines
