"""Prometheus metrics of a serving host (``GET /metrics``, via ``prometheus-client``).

Names follow vLLM's (``vllm:time_to_first_token_seconds`` and so on) with a ``helix_`` prefix.
Counters and histograms move as requests are served through the HTTP API; gauges are read from
the host at scrape time, among them what each worker last reported (``NodeStats``, about once a
second): KV cache use, queued work, bytes sent per link.

==========================================  =========  ===============================================
name                                        type       what
==========================================  =========  ===============================================
helix_requests_total{outcome}               counter    requests ended: stop, length, abort (the client
                                                       left), error, overloaded (429), unavailable
                                                       (503), invalid (4xx), unauthorized
helix_prompt_tokens_total                   counter    prompt tokens of served requests
helix_generation_tokens_total               counter    tokens generated
helix_time_to_first_token_seconds           histogram  request received to first token
helix_time_per_output_token_seconds         histogram  between consecutive tokens of a request
helix_e2e_request_latency_seconds           histogram  request received to last token
helix_generation_tokens_per_second          gauge      tokens generated over the last 10 s, per second
helix_num_requests_running                  gauge      HTTP requests in progress
helix_num_requests_waiting                  gauge      queries in the host's admission queue
helix_num_queries_active                    gauge      queries admitted on the cluster (any client)
helix_kv_cache_usage_perc{node}             gauge      KV cache in use, 0 to 1, as the worker reports
helix_node_queued_work{node}                gauge      work items waiting at the node
helix_link_bytes_total{src,dst}             counter    bytes sent on the link (host: src="host")
helix_link_flow_share{src,dst,kind}         gauge      the link's share of its source's traffic: kind
                                                       "plan" (max-flow) or "observed" (bytes)
helix_dropped_frames_total{node}            counter    malformed frames and messages dropped
helix_worker_up{node}                       gauge      1 while the worker answers heartbeats
helix_worker_report_age_seconds{node}       gauge      since the worker's last report
helix_workers_lost_total, ..._rejoined_     counter    workers lost, rejoined, drained; requests
_total, ..._drained_total, helix_requests_             migrated and requests that found no live route
migrated_total, ..._failed_unrecovered_total           in time
helix_admission_stopped                     gauge      1 while some layer has no live worker
helix_link_rtt_seconds{src,dst}             gauge      heartbeat round trip, smoothed
helix_link_retries_total{src,dst}           counter    messages sent again on the link
helix_link_degraded{src,dst}                gauge      1 while the link's flow share is cut
==========================================  =========  ===============================================
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics"]

# buckets as vLLM's (seconds)
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
_RATE_WINDOW_S = 10.0


def _node_name(n: Any) -> str:
    return "host" if isinstance(n, str) else str(n)


class _ClusterCollector:
    """Gauges and per-node counters read from the HostServer at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterable[Any]:
        m = self.m
        s = m.server
        now = s.clock.now()
        host = s.host
        waiting = GaugeMetricFamily("helix_num_requests_waiting", "Queries in the host's admission queue")
        waiting.add_metric([], float(host.waiting if host is not None else 0))
        yield waiting
        active = GaugeMetricFamily("helix_num_queries_active", "Queries admitted on the cluster")
        active.add_metric([], float(host.active if host is not None else 0))
        yield active
        rate = GaugeMetricFamily("helix_generation_tokens_per_second", f"Tokens generated over the last {_RATE_WINDOW_S:g} s, per second")
        rate.add_metric([], m.tokens_per_second(now))
        yield rate
        kv = GaugeMetricFamily("helix_kv_cache_usage_perc", "KV cache in use (0-1), as the worker reports", labels=["node"])
        queued = GaugeMetricFamily("helix_node_queued_work", "Work items waiting at the node", labels=["node"])
        up = GaugeMetricFamily("helix_worker_up", "1 while the worker answers heartbeats", labels=["node"])
        age = GaugeMetricFamily("helix_worker_report_age_seconds", "Seconds since the worker's last report", labels=["node"])
        dropped = CounterMetricFamily("helix_dropped_frames", "Malformed frames and messages dropped", labels=["node"])
        link_bytes = CounterMetricFamily("helix_link_bytes", "Bytes sent on the link", labels=["src", "dst"])
        share = GaugeMetricFamily("helix_link_flow_share", "The link's share of its source's traffic", labels=["src", "dst", "kind"])
        tp = s.tp
        dropped.add_metric(["host"], float(tp.stats.bad_frames + tp.drops.total + s.counters.bad_messages))
        observed: dict[str, dict[str, float]] = {"host": {}}
        for peer, n in tp.bytes_sent().items():
            if isinstance(peer, int):
                observed["host"][str(peer)] = float(n)
        for node, st in sorted(s.nodes.items()):
            label = str(node)
            up.add_metric([label], 0.0 if st.lost or not st.address else 1.0)
            ns = st.stats
            if ns is None:
                continue
            age.add_metric([label], max(0.0, now - st.stats_at))
            kv.add_metric([label], ns.kv_used / ns.kv_capacity if ns.kv_capacity > 0 else 0.0)
            queued.add_metric([label], float(ns.queued))
            dropped.add_metric([label], float(ns.bad_frames))
            observed[label] = {("host" if p < 0 else str(p)): float(b) for p, b in zip(ns.peers, ns.bytes_out, strict=True)}
        for src, outs in observed.items():
            total = sum(outs.values())
            for dst, b in sorted(outs.items()):
                link_bytes.add_metric([src, dst], b)
                if total > 0:
                    share.add_metric([src, dst, "observed"], b / total)
        for (src, dst), f in m.plan_shares.items():
            share.add_metric([src, dst, "plan"], f)
        c = s.counters
        for name, doc, value in (
            ("helix_workers_lost", "Workers reported lost (silent past the limit)", c.workers_lost),
            ("helix_workers_rejoined", "Workers that took a lost node's place", c.rejoined),
            ("helix_workers_drained", "Workers that left on request", c.drained),
            ("helix_requests_migrated", "Requests moved off a lost or draining worker", c.migrated),
            ("helix_requests_failed_unrecovered", "Requests no live route took within the recovery timeout",
             c.failed_on_lost_worker),
        ):
            fam = CounterMetricFamily(name, doc)
            fam.add_metric([], float(value))
            yield fam
        rtt = GaugeMetricFamily("helix_link_rtt_seconds", "Heartbeat round trip of the link, smoothed", labels=["src", "dst"])
        resent = CounterMetricFamily("helix_link_retries", "Messages sent again on the link", labels=["src", "dst"])
        degraded = GaugeMetricFamily("helix_link_degraded", "1 while the link's flow share is cut (slow or lossy)",
                                     labels=["src", "dst"])
        for (a, b), (r, n, _bad_at, deg) in sorted(s.link_health.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
            labels = [_node_name(a), _node_name(b)]
            rtt.add_metric(labels, float(r))
            resent.add_metric(labels, float(n))
            degraded.add_metric(labels, 1.0 if deg else 0.0)
        yield from (rtt, resent, degraded)
        stopped = GaugeMetricFamily("helix_admission_stopped", "1 while some layer has no live worker")
        stopped.add_metric([], 1.0 if s.admission_stopped else 0.0)
        yield stopped
        yield from (kv, queued, up, age, dropped, link_bytes, share)


class Metrics:
    """The host's metrics (see the module doc); ``render()`` is the ``/metrics`` body."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("helix_requests", "Requests ended, by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("helix_prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.generation_tokens = Counter("helix_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("helix_time_to_first_token_seconds", "Request received to first token", buckets=_TTFT, registry=r)
        self.tpot = Histogram("helix_time_per_output_token_seconds", "Between consecutive tokens of a request", buckets=_TPOT,
                              registry=r)
        self.e2e = Histogram("helix_e2e_request_latency_seconds", "Request received to last token", buckets=_E2E, registry=r)
        self.running_g = Gauge("helix_num_requests_running", "HTTP requests in progress", registry=r)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per token event, last window
        self.plan_shares = self._plan_shares()
        r.register(_ClusterCollector(self))

    def _plan_shares(self) -> dict[tuple[str, str], float]:
        """Each link's share of its source's out-flow in the plan's max flow."""
        out: dict[str, dict[str, float]] = {}
        flow = self.server.flow
        for (u, v), f in getattr(flow, "link_flows", {}).items():
            if f <= 0:
                continue
            src, dst = _node_name(u), _node_name(v)
            out.setdefault(src, {})[dst] = out.setdefault(src, {}).get(dst, 0.0) + float(f)
        shares = {}
        for src, d in out.items():
            total = sum(d.values())
            for dst, f in d.items():
                shares[(src, dst)] = f / total
        return shares

    # ---- hooks (the HTTP API calls them) --------------------------------------------------------

    def token(self, dt: float, *, first: bool) -> None:
        (self.ttft if first else self.tpot).observe(max(0.0, dt))
        self.generation_tokens.inc()
        now = self.server.clock.now()
        self._recent.append((now, 1))
        self._trim(now)

    def request_tokens(self, prompt: int, completion: int, e2e: float) -> None:
        self.prompt_tokens.inc(prompt)
        if completion > 0:
            self.e2e.observe(max(0.0, e2e))

    def request_done(self, outcome: str) -> None:
        self.requests.labels(outcome=outcome).inc()

    def running(self, delta: int) -> None:
        self.running_g.inc(delta)

    # ---- read-outs ------------------------------------------------------------------------------

    def _trim(self, now: float) -> None:
        q = self._recent
        while q and q[0][0] < now - _RATE_WINDOW_S:
            q.popleft()

    def tokens_per_second(self, now: float) -> float:
        self._trim(now)
        return sum(n for _, n in self._recent) / _RATE_WINDOW_S

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
