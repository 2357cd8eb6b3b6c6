"""What a plan serves: an analytic model of decode throughput, TTFT and time per output token.

Max flow (docs/original.md §6) prices each node at a *typical* batch and ignores the two things that
decide what users get from a pipeline of layer slices:

* **KV capacity bounds the population.** MaxFlow admission (docs/original.md §7.2) reserves
  ``E(n) = n + 240 * ratio`` tokens on every layer of a query's route and the offline feeder stops
  at a bottleneck usage of 0.8 (§8.8). Summed over the nodes holding a layer ``l``, the tokens a
  layer can hold are ``C_l = sum_i kv_i / k_i``; the population is ``N = 0.8 * min_l C_l / E_w``
  where ``E_w`` is the expected reservation of a query *in flight* (queries stay in proportion to
  their output length, so long-output queries weigh more). Each node's own check (fill limit
  0.85) bounds it too, per range: a node that fails its check is skipped for another next hop
  (§7.1), so the nodes holding one range fill together whatever their flow shares.
* **Little's law sets throughput.** Every decoding query has one token in the pipeline, so decode
  throughput ``D = N_decoding / TPOT``.

The time per output token (TPOT) of a route is built from the simulator's rules (docs/original.md
§7.1, §8.5), not fitted to its output:

* **Batches.** Decode tokens move in trains (see ``TRAIN_CYCLES``); a node of flow share ``s``
  runs batches of at least ``s * m / TRAIN_CYCLES`` tokens, split at the profiled batch limit. A
  node batches all the decode work queued when it starts a batch, so the tokens that arrive while
  one batch runs make the next: a busy node's batch ``b`` grows until ``b = D * s * w(b)``. A
  train waits behind the node's other decode work (processor sharing: ``w / (1 - decode busy)``),
  but never longer than one batch (``WAIT_CAP``: what is queued joins the next batch).
* **Prompts.** A node runs one layer at a time and finishes a prompt's layers before returning to
  a train that arrived behind it; the prompt is then ahead of the train on the same links, so the
  train follows it at the slower pace of the two for as long as their routes agree (the convoy
  that makes long chains slow). A train finds a prompt at a node with the node's prompt
  utilisation.
* **Links.** A link serialises one message at a time and latency is pipelined, so at every hop
  a token waits the latency, half of its train's serialisation, and (with the link's prompt
  utilisation) the rest of a prompt's.

``D`` solves ``D * TPOT(D) = N_decoding`` (prompt load grows with D), capped where the busiest node
or link saturates. Online, arrivals set ``D`` unless the KV or compute cap is lower. TTFT is the
prompt's compute on every stage plus transfer, plus half a decode batch of waiting per stage.
Goodput under an SLO counts, per route, the output tokens of the dataset's requests whose
predicted TTFT and TPOT are within it.

The inputs are the profiles, node settings, admission constants and the length dataset; the one
constant measured in the simulator is ``TRAIN_CYCLES``, on one plan. ``bench/bench_served_model.py``
measures how well the model ranks plans against the simulator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple

from ..flowplan import FlowPlan
from ..ids import SINK, SOURCE, LayerRange, NodeRef
from ..model import ThroughputModel, load_profiles
from ..settings import ServedWorkload
from ..workloads import load_lengths
from .core import Placement
from .flow import max_flow

__all__ = ["SLO", "ServedModel", "ServedPrediction", "ServedWorkload", "parse_slo", "predict"]

#: MaxFlow admission constants (docs/original.md §7.2, §8.8).
AVG_OUTPUT_LEN = 240
FEED_HWM = 0.8
#: Decode tokens move in batches ("trains"): a prompt's completion starts a new one and trains
#: merge where one queues behind another. A train lives about this many token cycles, so the
#: population N (queries decoding) moves in ``TRAIN_CYCLES * N / m`` trains (m: mean output, the
#: cycles a query lives) and a node of flow share s runs decode batches of ``s * m /
#: TRAIN_CYCLES``. Measured once, on the original's shipped single24 ILP layout (simulated decode
#: tokens per layer batch); every other plan is out of sample (bench_served_model.py).
TRAIN_CYCLES = 13.8
#: A node's busy fraction is capped here in the processor-sharing residence w / (1 - busy).
MAX_BUSY = 0.95
#: Iterations of a busy node's batch-size fixed point (it converges in a few).
BATCH_ITERS = 50
#: A decode token's residence at a node is at most this many batch times: the batch in service,
#: then its own (everything queued when a batch starts joins it).
WAIT_CAP = 2.0


class SLO(NamedTuple):
    """Service-level objective: a request meets it when its TTFT and its mean TPOT are within
    (seconds). A pair, so it unpacks as the ``(ttft, tpot)`` the simulator's report takes."""

    ttft: float
    tpot: float

    def __str__(self) -> str:
        return f"ttft={self.ttft:g},tpot={self.tpot:g}"


#: The longest latency an SLO may name, seconds (a day: far past any request's life).
SLO_MAX_S = 86_400.0


def parse_slo(text: str) -> SLO:
    """``ttft=S,tpot=S`` (seconds) -> SLO; ValueError naming the bad part."""
    got: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key = key.strip().lower()
        if not sep or key not in ("ttft", "tpot"):
            raise ValueError(f"--slo: expected ttft=S,tpot=S, got {part.strip()!r}")
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"--slo: {key} must be seconds, got {value.strip()!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"--slo: {key} must be a finite number > 0 (seconds), got {value.strip()[:40]!r}")
        if v > SLO_MAX_S:
            raise ValueError(f"--slo: {key} must be <= {SLO_MAX_S:g} seconds, got {value.strip()[:40]!r}")
        got[key] = v
    missing = {"ttft", "tpot"} - set(got)
    if missing:
        raise ValueError(f"--slo: missing {', '.join(sorted(missing))} (expected ttft=S,tpot=S)")
    return SLO(got["ttft"], got["tpot"])


@dataclass(frozen=True)
class _Lengths:
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    mean_in: float
    mean_out: float
    # a small stratified subset (sorted by input) for per-request sums (goodput, prompt times)
    sample: tuple[tuple[int, int], ...]
    sum_in_out: float  # sum of input * output over the dataset
    sum_in: float
    sum_out: float


@lru_cache(maxsize=8)
def _lengths(name: str) -> _Lengths:
    inp, out = load_lengths(name)
    ins, outs = tuple(int(x) for x in inp), tuple(int(x) for x in out)
    pairs = sorted(zip(ins, outs, strict=True))
    step = max(1, len(pairs) // 400)
    return _Lengths(ins, outs, sum(ins) / len(ins), sum(outs) / len(outs), tuple(pairs[::step]),
                    float(sum(n * m for n, m in pairs)), float(sum(ins)), float(sum(outs)))


@dataclass
class NodeLoad:
    """One node's predicted state (per-token figures in seconds)."""

    node: int
    gpu: str
    layers: tuple[int, int]
    share: float  # of the queries passing through it
    decode_batch: float  # mean decode batch (sequences)
    decode_stage_s: float  # a decode token's time at this node
    prompt_util: float  # fraction of time on prompts
    util: float  # total busy fraction
    kv_tokens: float  # tokens of context it can hold per layer
    kv_usage: float  # predicted KV expectation usage


@dataclass
class ServedPrediction:
    """Predicted serving figures of a plan on a workload (tokens/s, seconds)."""

    max_flow: float
    decode_throughput: float
    tpot: float
    ttft: float
    population: float  # queries in flight
    kv_population: float  # the KV expectation's limit on it
    compute_cap: float  # decode tokens/s at which the busiest node or link saturates
    limit: str  # "kv", "compute", "arrivals" or "flow" (the plan has no flow)
    limit_detail: str
    bottleneck_layers: tuple[int, int]  # [a, b) layers with the least KV
    nodes: list[NodeLoad] = field(default_factory=list)
    routes: list[tuple[tuple[int, ...], float, float, float]] = field(default_factory=list)  # (nodes, share, tpot, ttft n=mean)
    workload: ServedWorkload = field(default_factory=ServedWorkload)
    _ttft_by_route: list[list[tuple[int, int, float]]] = field(default_factory=list, repr=False)

    def goodput(self, slo: SLO) -> float:
        """Decode tokens/s of requests predicted to meet both limits of ``slo``."""
        if self.decode_throughput <= 0:
            return 0.0
        met = tot = 0.0
        for (_, share, tpot, _), reqs in zip(self.routes, self._ttft_by_route, strict=True):
            for _n, m, ttft in reqs:
                tot += share * m
                if tpot <= slo.tpot and ttft <= slo.ttft:
                    met += share * m
        return self.decode_throughput * (met / tot if tot > 0 else 0.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_flow": self.max_flow,
            "decode_throughput": self.decode_throughput,
            "tpot": self.tpot,
            "ttft": self.ttft,
            "population": self.population,
            "kv_population": self.kv_population,
            "compute_cap": self.compute_cap,
            "limit": self.limit,
            "limit_detail": self.limit_detail,
            "bottleneck_layers": list(self.bottleneck_layers),
        }


class NodeState(NamedTuple):
    """What the model predicts for one node at a population (``ServedModel.predict``)."""

    decode_residence: float  # seconds a decode token spends at the node (its batch, queueing included)
    prompt_util: float  # share of the node's time spent on prompts
    busy: float  # share of the node's time spent computing (prompts and decodes)
    batch: float  # decode tokens per batch


def _routes(placement: Placement, flow: FlowPlan) -> list[tuple[list[NodeRef], float]]:
    """Decompose the flow into source-to-sink paths (widest first); (path, flow)."""
    rem = {k: v for k, v in flow.link_flows.items() if v > 1e-9}
    out: list[tuple[list[NodeRef], float]] = []
    for _ in range(10_000):
        path: list[NodeRef] = [SOURCE]
        u: NodeRef = SOURCE
        while u != SINK:
            nxt = [(f, v) for (a, v), f in rem.items() if a == u and f > 1e-9]
            if not nxt:
                break
            u = max(nxt, key=lambda fv: (fv[0], -1 if fv[1] == SINK else int(fv[1])))[1]
            path.append(u)
        if path[-1] != SINK or len(path) < 3:
            break
        f = min(rem[(path[j], path[j + 1])] for j in range(len(path) - 1))
        for j in range(len(path) - 1):
            rem[(path[j], path[j + 1])] -= f
        out.append((path, f))
        if f <= 1e-9 * max(flow.value, 1.0):
            break
    return out


class ServedModel:
    """Predicts what plans on one cluster serve (profiles and length statistics cached)."""

    def __init__(self, workload: ServedWorkload | None = None) -> None:
        self.workload = workload or ServedWorkload()
        self._lengths = _lengths(self.workload.lengths)

    def predict(self, placement: Placement, flow: FlowPlan | None = None, tm: ThroughputModel | None = None) -> ServedPrediction:
        wl = self.workload
        spec = placement.model_spec
        cluster = placement.cluster
        tm = tm if tm is not None else ThroughputModel.for_cluster(spec, cluster)
        profiles = load_profiles(spec)
        flow = flow if flow is not None else max_flow(placement, tm)
        F = flow.value
        L = spec.num_layers
        lens = self._lengths
        n_bar, m_bar = lens.mean_in, lens.mean_out
        hwm, ratio = wl.kv_params
        act = float(spec.activation_size)
        used = [i for i in placement.used_nodes() if flow.node_flows.get(i, 0.0) > 1e-9]

        # --- KV: tokens each layer can hold (every node with layers counts, as the expectation does)
        layer_tokens = [0.0] * L
        kv_tok: dict[int, float] = {}
        for i, r in placement.layers.items():
            if r is None:
                continue
            k = r[1] - r[0]
            kv_tok[i] = tm.kv_capacity(cluster.machine(i).gpu, k) / k
            for layer in range(r[0], r[1]):
                layer_tokens[layer] += kv_tok[i]
        low = min(layer_tokens) if layer_tokens else 0.0
        first = layer_tokens.index(low)
        last = first
        while last + 1 < L and layer_tokens[last + 1] == low:
            last += 1

        share = {i: flow.node_flows[i] / F for i in used} if F > 0 else {}
        gpu = {i: profiles.canonical(cluster.machine(i).gpu) for i in used}
        # layers each node runs per query: all of its range, or with partial inference (a link
        # into the middle of the range) only those from the sender's end on, weighted by the
        # flow on each link into the node (the router runs the rest, KV is reserved for them)
        k_full = {i: placement.layers[i][1] - placement.layers[i][0] for i in used}  # type: ignore[index]
        k_of: dict[int, float] = dict(k_full)
        if placement.partial and F > 0:
            run_in: dict[int, float] = {}
            for (u, v), f in flow.link_flows.items():
                if v == SINK or f <= 1e-9 or v not in k_of:
                    continue
                rv = placement.layers[int(v)]
                ru = None if u == SOURCE else placement.layers.get(int(u))
                start = rv[0] if ru is None else max(rv[0], ru[1])  # type: ignore[index]
                run_in[int(v)] = run_in.get(int(v), 0.0) + f * (rv[1] - start)  # type: ignore[index]
            for i in used:
                if flow.node_flows[i] > 0 and i in run_in:
                    k_of[i] = run_in[i] / flow.node_flows[i]
        prof = {i: profiles.profile(gpu[i]) for i in used}
        dec_cap = {}
        for i in used:
            ns = profiles.node_settings(gpu[i])
            dec_cap[i] = ns.decode_limit_tokens(min(k_full[i], ns.max_layers))
        # prompt time per layer over the dataset: mean and mean square (for the residual)
        sample = lens.sample
        tp1: dict[int, float] = {}
        tp2: dict[int, float] = {}
        for i in used:
            ts = [prof[i].prompt(n) for n, _ in sample]
            tp1[i] = sum(ts) / len(ts)
            tp2[i] = sum(t * t for t in ts) / len(ts)

        # links: per-token hop time and per-arc share of queries
        arcs = [(u, v, f / F) for (u, v), f in flow.link_flows.items() if f > 1e-9] if F > 0 else []
        hop_dec = 0.0
        arc_wait: dict[tuple[NodeRef, NodeRef], float] = {}
        hop_cap = math.inf  # decode tokens/s at which a link saturates
        n_sq = sum(n * n for n in lens.inputs) / len(lens.inputs)
        arc_rho: dict[tuple[NodeRef, NodeRef], float] = {}  # prompt wait per unit of D
        for u, v, s in arcs:
            a = cluster.arc(u, v)
            if a is None:
                continue
            # a link is a FIFO serialising one message at a time; latency is pipelined
            # (transport/memory.py): a token waits for half of its train (s * m / TRAIN_CYCLES
            # tokens) to be serialised, and for the rest of a prompt being serialised when it comes
            send = act / a.bandwidth
            train = s * m_bar / TRAIN_CYCLES
            arc_wait[(u, v)] = a.latency + send * (train + 1) / 2
            prompt_busy_per_d = s * n_bar * send / m_bar  # the link's prompt utilisation per decode token/s
            arc_rho[(u, v)] = prompt_busy_per_d * (n_sq / (2 * n_bar)) * send
            hop_dec += s * arc_wait[(u, v)]
            # link time per decode token crossing it: its own send, plus a prompt per m tokens
            per_dec = s * send + prompt_busy_per_d
            if per_dec > 0:
                hop_cap = min(hop_cap, 1.0 / per_dec)
        hop_prompt_rho = sum(s * arc_rho.get((u, v), 0.0) for u, v, s in arcs)

        def kv_population(c: float) -> float:
            # in-flight weights: residence ~ TTFT + m * TPOT, i.e. m + c in TPOT units
            # sum(n * (m + c)) / sum(m + c), from sums kept per dataset (this runs per prediction)
            count = len(lens.inputs)
            ew = (lens.sum_in_out + c * lens.sum_in) / (lens.sum_out + c * count) + AVG_OUTPUT_LEN * ratio
            limit = FEED_HWM if wl.mode == "offline" else hwm
            n_layer = limit * low / ew if ew > 0 else 0.0
            # the nodes' own admission checks (fill limit ``hwm``; a query reserves the layers it
            # runs): a node that fails its check is skipped for another next hop (Fail-KV, docs/original.md
            # §7.1), so nodes holding the same range fill together: their queries over their shares
            n_node = min((hwm * held[r] / (taken[r] * ew) for r in held if taken[r] > 0), default=math.inf)
            return min(n_layer, n_node)

        held: dict[LayerRange, float] = {}
        taken: dict[LayerRange, float] = {}
        for i in used:
            r = placement.layers[i]
            assert r is not None
            held[r] = held.get(r, 0.0) + kv_tok[i] * k_full[i] / k_of[i]
            taken[r] = taken.get(r, 0.0) + share[i]

        def node_state(i: int, N: float, D: float, T: float) -> NodeState:
            """Node i's state with T trains."""
            lam = D / m_bar if m_bar > 0 else 0.0
            b = b_train = max(N * share[i] / T, 1.0)
            arrive = D * share[i]  # decode tokens/s reaching the node

            def batch_time(x: float) -> float:
                nb = math.ceil(x / dec_cap[i]) if dec_cap[i] > 0 else 1
                return k_of[i] * prof[i].decode(x / nb) * nb

            # the tokens that arrive while a batch runs are the next batch: a busy node's batches
            # grow past a train's share until they run as fast as tokens arrive
            for _ in range(BATCH_ITERS):
                nxt = max(b_train, arrive * batch_time(b))
                if nxt > N * share[i] or abs(nxt - b) < 1e-3:
                    b = min(nxt, max(N * share[i], 1.0))
                    break
                b = nxt
            w = batch_time(b)
            rho_p = lam * share[i] * k_of[i] * tp1[i]
            rho_d = D * share[i] * w / b
            busy = rho_d + rho_p
            # prompts are priced per route (route_tpot): here only the decode load queues
            return NodeState(w * min(1.0 / (1.0 - min(rho_d, MAX_BUSY)), WAIT_CAP), rho_p, busy, b)

        def route_tpot(nodes_r: Sequence[int], st: Mapping[int, NodeState]) -> float:
            """A decode token's compute time along a route. A train that finds a prompt at a node
            waits out the prompt's remaining layers there, then follows it (the prompt is ahead on
            the same links) at the slower of the two paces for as long as their routes agree."""
            t = 0.0
            behind = 0.0  # probability the train is following a prompt when it reaches this node
            prev: int | None = None
            for i in nodes_r:
                if prev is not None:
                    nf = flow.node_flows.get(prev, 0.0)
                    behind *= flow.link_flows.get((prev, i), 0.0) / nf if nf > 0 else 0.0
                q = min(st[i].prompt_util, MAX_BUSY)  # a prompt is in service when the train arrives
                prompt_stage = k_of[i] * tp1[i]
                resid = k_of[i] * tp2[i] / (2 * tp1[i]) if tp1[i] > 0 else 0.0
                own = st[i].decode_residence
                meet = (1.0 - behind) * q
                t += behind * max(prompt_stage, own) + meet * (resid + own) + (1.0 - behind - meet) * own
                behind = behind + meet
                prev = i
            return t

        def stage_times(N: float, D: float) -> dict[int, NodeState]:
            """node -> (decode residence s, prompt utilisation, busy fraction, batch) at population N, rate D.

            N decoding queries move in ``TRAIN_CYCLES * N / m`` trains (see the module doc)."""
            T = max(1.0, TRAIN_CYCLES * N / m_bar)
            return {i: node_state(i, N, D, T) for i in used}

        def tpot_at(N: float, D: float) -> float:
            st = stage_times(N, D)
            return sum(sh * route_tpot(nodes_r, st) for nodes_r, sh, _, _ in route_hops) + hop_dec + D * hop_prompt_rho

        def cap_at(N: float) -> float:
            # decode tokens/s where some node is fully busy (busy is linear in D for fixed batches)
            best = hop_cap
            for i in used:
                b = max(N * share[i], 1.0)
                nb = math.ceil(b / dec_cap[i]) if dec_cap[i] > 0 else 1
                d = k_of[i] * prof[i].decode(b / nb) * nb
                per = share[i] * (d / b + k_of[i] * tp1[i] / m_bar)
                if per > 0:
                    best = min(best, 1.0 / per)
            return best

        def ttft_of(n: int, route: Sequence[int], st: Mapping[int, NodeState]) -> float:
            t = 0.0
            for i in route:
                t += k_of[i] * prof[i].prompt(n) + 0.5 * st[i].decode_residence
            return t

        if F <= 0 or not used:
            return ServedPrediction(F, 0.0, math.inf, math.inf, 0.0, 0.0, 0.0, "flow", "the plan has no flow", (first, last + 1), workload=wl)

        routes_raw = _routes(placement, flow)
        # per route: its compute nodes, its share of the queries, a decode token's hop time (its
        # train's wait at each link) and a prompt's hop time at the mean input length
        route_hops: list[tuple[list[int], float, float, float]] = []
        for path, f in routes_raw:
            hd = hp = 0.0
            for j in range(len(path) - 1):
                a = cluster.arc(path[j], path[j + 1])
                if a is not None:
                    hd += arc_wait.get((path[j], path[j + 1]), 0.0)
                    hp += a.latency + n_bar * act / a.bandwidth
            route_hops.append(([int(x) for x in path[1:-1]], f / F, hd, hp))

        # fixed point: population (KV) -> D with D * TPOT(D) = N_dec, capped
        c = 3.0
        N = D = tpot = cap = N_dec = 0.0
        lam = wl.rate / (n_bar + m_bar)
        for _ in range(6):
            N_kv = kv_population(c)
            if wl.mode == "offline":
                N = N_kv
                # decoding share of the population: m TPOT / (TTFT + m TPOT) = m / (m + c)
                N_dec = N * m_bar / (m_bar + c)
                cap = cap_at(N_dec)
                lo, hi = 0.0, cap
                for _ in range(60):
                    mid = 0.5 * (lo + hi)
                    if mid * tpot_at(N_dec, mid) < N_dec:
                        lo = mid
                    else:
                        hi = mid
                D = lo
                tpot = N_dec / D if D > 0 else math.inf
            else:
                D_off = lam * m_bar
                # population at the offered rate (Little), bounded by KV
                N_dec = D_off * tpot_at(max(D_off * 1.0, 1.0), D_off)
                for _ in range(30):
                    N_dec = D_off * tpot_at(N_dec, D_off)
                N_lim = N_kv * m_bar / (m_bar + c)
                N_dec = min(N_dec, N_lim)
                cap = cap_at(N_dec)
                D = min(D_off, cap, N_dec / tpot_at(N_dec, min(D_off, cap)))
                tpot = tpot_at(N_dec, D)
                N = N_dec * (m_bar + c) / m_bar
            st = stage_times(N_dec, D)
            ttft_mean = sum(sh * (ttft_of(int(n_bar), nodes_r, st) + hp) for nodes_r, sh, _, hp in route_hops)
            c_new = ttft_mean / tpot if tpot > 0 and math.isfinite(tpot) else 0.0
            if abs(c_new - c) < 1e-3:
                c = c_new
                break
            c = c_new

        st = stage_times(N_dec, D)
        nodes = [
            NodeLoad(
                i, gpu[i], placement.layers[i], share[i], st[i].batch, st[i].decode_residence, st[i].prompt_util, st[i].busy,  # type: ignore[arg-type]
                kv_tok[i], N * share[i] * (n_bar + AVG_OUTPUT_LEN * ratio) / kv_tok[i] if kv_tok[i] > 0 else 0.0,
            )
            for i in used
        ]
        routes = []
        ttft_reqs = []
        for nodes_r, sh, hd, _ in route_hops:
            hops: list[NodeRef] = [SOURCE, *nodes_r, SINK]
            r_tpot = route_tpot(nodes_r, st) + hd + D * sum(arc_rho.get((hops[j], hops[j + 1]), 0.0) for j in range(len(hops) - 1))
            reqs = []
            for n, m in sample:
                t = ttft_of(n, nodes_r, st)
                for j in range(len(nodes_r) + 1):
                    u = SOURCE if j == 0 else nodes_r[j - 1]
                    v = SINK if j == len(nodes_r) else nodes_r[j]
                    a = cluster.arc(u, v)
                    if a is not None:
                        t += a.latency + n * act / a.bandwidth
                reqs.append((n, m, t))
            routes.append((tuple(nodes_r), sh, r_tpot, sum(x[2] for x in reqs) / len(reqs)))
            ttft_reqs.append(reqs)
        ttft = sum(sh * t for _, sh, _, t in routes) / max(sum(sh for _, sh, _, _ in routes), 1e-12)

        if wl.mode == "online" and D >= lam * m_bar * (1 - 1e-9):
            limit, detail = "arrivals", f"serves the offered {wl.rate:g} tokens/s"
        elif D >= cap * (1 - 1e-6):
            busiest = max(nodes, key=lambda x: x.util)
            if hop_cap <= cap * (1 + 1e-9):
                limit, detail = "compute", "a link's bandwidth"
            else:
                limit, detail = "compute", f"node {busiest.node} ({busiest.gpu}, layers {busiest.layers[0]}-{busiest.layers[1]}) is saturated"
        else:
            slow = max(nodes, key=lambda x: x.share * x.decode_stage_s)
            kv_nodes = sorted(i for i, r in placement.layers.items() if r is not None and r[0] <= last and r[1] > first)
            limit = "kv"
            detail = (
                f"KV on layers {first}-{last + 1} (nodes {', '.join(str(i) for i in kv_nodes)}) holds "
                f"{N:.0f} queries; slowest stage node {slow.node} ({slow.gpu}) {slow.decode_stage_s:.3f} s per token"
            )
        return ServedPrediction(
            max_flow=F,
            decode_throughput=D,
            tpot=tpot,
            ttft=ttft,
            population=N,
            kv_population=kv_population(c),
            compute_cap=cap,
            limit=limit,
            limit_detail=detail,
            bottleneck_layers=(first, last + 1),
            nodes=nodes,
            routes=routes,
            workload=wl,
            _ttft_by_route=ttft_reqs,
        )


def predict(placement: Placement, workload: ServedWorkload | None = None, flow: FlowPlan | None = None) -> ServedPrediction:
    """Predicted serving figures of ``placement`` (see the module doc)."""
    return ServedModel(workload).predict(placement, flow)
