"""Prometheus metrics of a serving host (``GET /metrics``, via ``prometheus-client``).

Names follow vLLM's (``vllm:time_to_first_token_seconds`` and so on) with a ``helix_`` prefix.
Counters and histograms move as requests are served through the HTTP API; gauges and the
cluster's counters come from the host's snapshot taken at scrape time
(:meth:`~helix_async.frontend.host_protocol.ServingHost.snapshot`), among them what each worker
last reported (about once a second): KV cache use, queued work, bytes sent per link.

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
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .host_protocol import HostSnapshot, ServingHost

__all__ = ["Metrics", "plan_shares"]

# buckets as vLLM's (seconds)
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
_RATE_WINDOW_S = 10.0


def plan_shares(flows: Mapping[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    """Each link's share of its source's out-flow, from the links' flows (any unit)."""
    out: dict[str, dict[str, float]] = {}
    for (src, dst), f in flows.items():
        if f > 0:
            d = out.setdefault(src, {})
            d[dst] = d.get(dst, 0.0) + float(f)
    return {(src, dst): f / sum(d.values()) for src, d in out.items() for dst, f in d.items()}


class _ClusterCollector:
    """Gauges and per-node counters read from the host's snapshot at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterable[Any]:
        m = self.m
        s: HostSnapshot = m.server.snapshot()
        waiting = GaugeMetricFamily("helix_num_requests_waiting", "Queries in the host's admission queue")
        waiting.add_metric([], float(s.waiting))
        yield waiting
        active = GaugeMetricFamily("helix_num_queries_active", "Queries admitted on the cluster")
        active.add_metric([], float(s.active))
        yield active
        rate = GaugeMetricFamily("helix_generation_tokens_per_second", f"Tokens generated over the last {_RATE_WINDOW_S:g} s, per second")
        rate.add_metric([], m.tokens_per_second(m.server.now()))
        yield rate
        kv = GaugeMetricFamily("helix_kv_cache_usage_perc", "KV cache in use (0-1), as the worker reports", labels=["node"])
        queued = GaugeMetricFamily("helix_node_queued_work", "Work items waiting at the node", labels=["node"])
        up = GaugeMetricFamily("helix_worker_up", "1 while the worker answers heartbeats", labels=["node"])
        age = GaugeMetricFamily("helix_worker_report_age_seconds", "Seconds since the worker's last report", labels=["node"])
        dropped = CounterMetricFamily("helix_dropped_frames", "Malformed frames and messages dropped", labels=["node"])
        batches = CounterMetricFamily("helix_node_batches", "Batches the worker has run", labels=["node"])
        busy = CounterMetricFamily("helix_node_busy_seconds", "Seconds the worker spent running batches", labels=["node"])
        link_bytes = CounterMetricFamily("helix_link_bytes", "Bytes sent on the link", labels=["src", "dst"])
        share = GaugeMetricFamily("helix_link_flow_share", "The link's share of its source's traffic", labels=["src", "dst", "kind"])
        dropped.add_metric(["host"], float(s.dropped))
        observed: dict[str, Mapping[str, int]] = {"host": s.bytes_out}
        for nr in sorted(s.nodes, key=lambda r: r.node):
            label = str(nr.node)
            up.add_metric([label], 1.0 if nr.up else 0.0)
            if nr.report_age is None:
                continue
            age.add_metric([label], max(0.0, nr.report_age))
            kv.add_metric([label], nr.kv_use)
            queued.add_metric([label], float(nr.queued))
            dropped.add_metric([label], float(nr.dropped))
            batches.add_metric([label], float(nr.batches))
            busy.add_metric([label], nr.busy_s)
            observed[label] = nr.bytes_out
        for src, outs in observed.items():
            total = sum(outs.values())
            for dst, b in sorted(outs.items()):
                link_bytes.add_metric([src, dst], float(b))
                if total > 0:
                    share.add_metric([src, dst, "observed"], b / total)
        for (src, dst), f in plan_shares(s.plan_flows).items():
            share.add_metric([src, dst, "plan"], f)
        for name, doc, value in (
            ("helix_workers_lost", "Workers reported lost (silent past the limit)", s.workers_lost),
            ("helix_workers_rejoined", "Workers that took a lost node's place", s.workers_rejoined),
            ("helix_workers_drained", "Workers that left on request", s.workers_drained),
            ("helix_requests_migrated", "Requests moved off a lost or draining worker", s.requests_migrated),
            ("helix_requests_failed_unrecovered", "Requests no live route took within the recovery timeout",
             s.requests_unrecovered),
        ):
            fam = CounterMetricFamily(name, doc)
            fam.add_metric([], float(value))
            yield fam
        rtt = GaugeMetricFamily("helix_link_rtt_seconds", "Heartbeat round trip of the link, smoothed", labels=["src", "dst"])
        resent = CounterMetricFamily("helix_link_retries", "Messages sent again on the link", labels=["src", "dst"])
        degraded = GaugeMetricFamily("helix_link_degraded", "1 while the link's flow share is cut (slow or lossy)",
                                     labels=["src", "dst"])
        for link in sorted(s.links, key=lambda x: (x.src, x.dst)):
            labels = [link.src, link.dst]
            rtt.add_metric(labels, float(link.rtt))
            resent.add_metric(labels, float(link.retries))
            degraded.add_metric(labels, 1.0 if link.degraded else 0.0)
        yield from (rtt, resent, degraded)
        stopped = GaugeMetricFamily("helix_admission_stopped", "1 while some layer has no live worker")
        stopped.add_metric([], 1.0 if s.admission_stopped else 0.0)
        yield stopped
        yield from (kv, queued, up, age, dropped, batches, busy, link_bytes, share)


class Metrics:
    """The host's metrics (see the module doc); ``render()`` is the ``/metrics`` body.

    server: the host the gauges are read from at scrape time (its :meth:`ServingHost.snapshot`)
    and whose clock times the token rate."""

    def __init__(self, server: ServingHost) -> None:
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
        r.register(_ClusterCollector(self))

    # ---- hooks (the HTTP API calls them) --------------------------------------------------------

    def token(self, dt: float, *, first: bool) -> None:
        (self.ttft if first else self.tpot).observe(max(0.0, dt))
        self.generation_tokens.inc()
        now = self.server.now()
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
