"""Settings objects: each owns its defaults, once.

The CLI builds these from its flags and passes them down; library code takes a settings object
instead of restating a default or a long keyword list. A settings object is a frozen value: to
change one field, ``dataclasses.replace`` it.

Sections below belong to the parts that read them (KV expectation: admission, planner and
simulator alike; search: the planners; simulation: the served planner's simulations and the
simulator's CLI; worker and host: the runtime's processes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import ConfigError

if TYPE_CHECKING:
    from .ids import NodeRef
    from .worker import BatchLimits

__all__ = ["HostSettings", "KVExpectation", "KV_OFFLINE", "KV_ONLINE", "kv_for_mode"]
__all__ += ["SEMANTICS", "SearchSettings", "ServedWorkload", "SimulationSettings"]
__all__ += ["WorkerOptions", "WorkerSettings"]


# --- KV expectation (admission) -------------------------------------------------------------------


class KVExpectation(NamedTuple):
    """The host's KV expectation at admission (docs/runtime.md, "Admission").

    fill_limit: the share of a node's KV cache that admitted work may be expected to fill (0, 1].
    output_ratio: the share of a request's output the admission expects it to still generate,
    as a fraction of the mean output length (0 < ratio).

    A NamedTuple, so it unpacks as the ``(fill limit, ratio)`` pair the routers take.
    """

    fill_limit: float
    output_ratio: float

    def __str__(self) -> str:
        return f"{self.fill_limit:g},{self.output_ratio:g}"


#: Offline (a population kept topped up): fill to 85 % and expect every admitted request to reach
#: the mean output length; the original's offline setting (docs/original.md, KV expectation).
KV_OFFLINE = KVExpectation(0.85, 1.0)
#: Online (arrivals at a rate): fill to 90 %, expect 60 % of the mean output; the original's online
#: setting, and the runtime host's default.
KV_ONLINE = KVExpectation(0.9, 0.6)


def kv_for_mode(mode: str) -> KVExpectation:
    """The default KV expectation of a workload mode (``offline`` or ``online``)."""
    if mode == "offline":
        return KV_OFFLINE
    if mode == "online":
        return KV_ONLINE
    raise ValueError(f"workload mode must be offline or online, got {mode!r}")


# --- Search (the planners) ------------------------------------------------------------------------


def _check_number(name: str, value: Any, *, positive: bool, finite: bool) -> None:
    """``value`` is a number (not a bool, not NaN) > 0 (``positive``) or >= 0, finite if asked."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    ok = ok and (value > 0 if positive else value >= 0) and (math.isfinite(value) or not finite)
    if not ok:
        bound = "> 0" if positive else ">= 0"
        raise ConfigError("<argument>", name, f"must be a {'finite ' if finite else ''}number {bound}, got {value!r}")


def _check_count(name: str, value: Any, *, low: int, optional: bool = True) -> None:
    """``value`` is an integer >= ``low`` (not a bool), or None when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = f"None or an integer >= {low}" if optional else f"an integer >= {low}"
        raise ConfigError("<argument>", name, f"must be {what}, got {value!r}")


@dataclass(frozen=True)
class SearchSettings:
    """How the planners search: ``placement.search.plan`` (the max-flow objective) and
    ``placement.served_plan.plan_served`` (the served objective); docs/planner.md.

    method: ``milp`` (the search) or one heuristic's name (``plan`` only).
    time_limit: seconds of wall time for the whole search (0: the heuristics' best, no search).
    stall_limit: max flow: seconds of wall time without an improvement that end the search.
    gap_limit: max flow: the search ends when (bound - value) / bound falls to this fraction.
    seed: every random choice of the search and of the seeded heuristics.
    partial: allow partial-inference links (Petals' plan always has them).
    position_fraction: max flow: the share of ``time_limit`` the position model may take
    (120 s at most).
    prune: max flow: the LNS neighbourhoods keep each node's ``prune`` fastest links (and the
    incumbent's); None keeps every link.
    node_limit: branch-and-bound nodes per MILP solve; None: each solve is bounded by time only.
    round_limit: LNS neighbourhoods solved by the max-flow search (also inside the served
    planner); None: as many as the time allows.
    sweep_limit: served: position-MILP solves of the sweep over KV floors; None: as many as its
    share of the time allows.
    step_limit: served: local-search steps (and ``explain``'s, per GPU type); None: as many as
    the time allows.
    simulate_top: served: candidates simulated (0: the best predicted plan is trusted).
    refine: served: neighbours of the pick simulated after the candidates (0: none).

    With the work bounds set and time limits that are not reached, a search's result does not
    depend on how fast the machine is (the tests run it so).
    """

    method: str = "milp"
    time_limit: float = 600.0
    stall_limit: float = 120.0
    gap_limit: float = 0.0
    seed: int = 0
    partial: bool = False
    position_fraction: float = 0.2
    prune: int | None = None
    node_limit: int | None = None
    round_limit: int | None = None
    sweep_limit: int | None = None
    step_limit: int | None = None
    simulate_top: int = 6
    refine: int = 6

    def __post_init__(self) -> None:
        # limits a search can honour: a NaN or a negative time would run forever or not at all
        _check_number("time_limit", self.time_limit, positive=False, finite=True)
        _check_number("stall_limit", self.stall_limit, positive=True, finite=False)
        _check_number("gap_limit", self.gap_limit, positive=False, finite=True)
        _check_number("position_fraction", self.position_fraction, positive=False, finite=True)
        _check_count("prune", self.prune, low=1)
        _check_count("node_limit", self.node_limit, low=1)
        _check_count("round_limit", self.round_limit, low=0)
        _check_count("sweep_limit", self.sweep_limit, low=0)
        _check_count("step_limit", self.step_limit, low=0)
        _check_count("simulate_top", self.simulate_top, low=0, optional=False)
        _check_count("refine", self.refine, low=0, optional=False)


# --- Simulation (the served planner's workload and simulations) -----------------------------------

#: How a candidate is simulated: ``helix``, the original simulator's semantics (as ``sim run
#: --compat helix``: offline, queries the KV check refuses are dropped), or ``ours`` (they wait).
SEMANTICS = ("helix", "ours")


@dataclass(frozen=True)
class ServedWorkload:
    """The workload a plan is judged on, by the served model and in simulation.

    mode: ``offline`` (a population kept topped up to the KV limit, the original's README offline
    run) or ``online`` (arrivals at ``rate`` tokens/s, prompt plus output). lengths: the length
    dataset. kv: the admission's KV expectation (fill limit, output ratio); None takes the mode's
    (:func:`kv_for_mode`).
    """

    mode: str = "offline"
    lengths: str = "azure-conv"
    rate: float = 700.0
    kv: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online"):
            raise ValueError(f"workload mode must be offline or online, got {self.mode!r}")
        if not self.rate > 0:
            raise ValueError(f"online rate must be > 0 tokens/s, got {self.rate!r}")

    @property
    def kv_params(self) -> KVExpectation:
        """The KV expectation in force: ``kv`` when given, else the mode's default."""
        return kv_for_mode(self.mode) if self.kv is None else KVExpectation(*self.kv)


@dataclass(frozen=True)
class SimulationSettings:
    """How the served planner simulates a candidate (docs/planner.md).

    workload: what the candidate serves (:class:`ServedWorkload`). window: seconds of simulated
    time in the statistics window (after the offline warm-up). seed: every random stream of the
    simulation. semantics: one of :data:`SEMANTICS`.
    """

    workload: ServedWorkload = field(default_factory=ServedWorkload)
    window: float = 600.0
    seed: int = 0
    semantics: str = "helix"

    def __post_init__(self) -> None:
        _check_number("window", self.window, positive=True, finite=True)
        if self.semantics not in SEMANTICS:
            raise ConfigError("<argument>", "semantics", f"must be one of {', '.join(SEMANTICS)}, got {self.semantics!r}")

    @property
    def compat(self) -> bool:
        """True when candidates are simulated with the original simulator's semantics."""
        return self.semantics == "helix"


# --- Worker (a compute node, and the worker process) ----------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    """One compute node's configuration: what :class:`helix_async.worker.Worker` runs with.

    The plan's part (``roles.WorkerRole``): layers ``(a, b)`` it holds; limits: its batch limits
    (``helix_async.worker.BatchLimits``); kv_capacity: KV entries (token x layer); out_links: the
    receivers of its links, with their layer ranges in next_layers.  The model's: num_layers (L);
    activation_bytes: bytes of one token's hidden state (the modelled payload of a mid-route
    message); token_bytes: bytes of one token id.  The scheduling policy's (its entry in
    ``helix_async.routing.policies``): free_links_only: a prompt leaves only on a link with nothing
    in flight, and waits here until one is free (Random, Shortest-queue); feedback: send
    ``Feedback`` to the previous hop when a request leaves (Swarm).  The run's: compat: the
    original's semantics (KV taken per layer and its overflow counted; the host-to-GPU copy charged
    for every request received since the first layer last ran, docs/original.md §8.4-8.6); fuse:
    run a batch through consecutive layers in one executor call when nothing else waits there (the
    same layer-by-layer schedule in fewer events); gather: before a batch at an entry layer, wait
    for the requests on their way back that are expected within this many times the node's last
    run (0: never wait; not in compat mode; see helix_async.worker, "Decode gathering").  Live KV
    migration (docs/migration.md): kv_token_bytes: bytes of one token's keys and values on one
    layer (a cost-model executor's modelled copy); migration_chunk: most positions in one copied
    chunk; migration_tail: the pre-copy stops when at most this many positions are left to copy.

    A value, not a live object: the per-hop chooser and a view of the neighbours' queues are given
    to the Worker beside it (``policy=``, ``peer_queue_len=``).
    """

    layers: tuple[int, int]
    num_layers: int
    limits: BatchLimits
    kv_capacity: int
    activation_bytes: int
    token_bytes: int = 2
    out_links: tuple[NodeRef, ...] = ()
    next_layers: Mapping[NodeRef, tuple[int, int]] = field(default_factory=dict)
    free_links_only: bool = False
    feedback: bool = False
    compat: bool = False
    fuse: bool = True
    gather: float = 0.1
    kv_token_bytes: int = 0
    migration_chunk: int = 256
    migration_tail: int = 4

    def __post_init__(self) -> None:
        g = self.gather
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 <= g <= 10.0:
            raise ConfigError("<WorkerSettings>", "gather", f"must be a number in [0, 10], got {g!r}")
        for name in ("kv_capacity", "activation_bytes", "token_bytes", "kv_token_bytes", "migration_chunk",
                     "migration_tail"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError("<WorkerSettings>", name, f"must be an integer >= 0, got {value!r}")
        if self.migration_chunk < 1:
            raise ConfigError("<WorkerSettings>", "migration_chunk", f"must be >= 1, got {self.migration_chunk}")
        object.__setattr__(self, "out_links", tuple(self.out_links))


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker process (``python -m helix_async worker``) runs; the ``worker`` command builds it
    from its flags, whose defaults are these (docs/runtime.md).

    connect: the host's ZeroMQ address. node_id: the plan node to serve (-1: any free one of this
    machine type). executor: a name in ``helix_async.executors.registry``. device: cpu, cuda or
    cuda:N. machine_type: the machine type it registers as (default CPU, or CUDA on a GPU).
    memory_bytes: what the device may hold, bytes (0: no check). bind: the inbox address. keys,
    key_name, insecure: CURVE (``transport/curve.py``). advertise: the address peers dial (default:
    the bound one). gather: decode gathering (``WorkerSettings.gather``).  The executors' own
    options (their flags in the registry): checkpoint (a checkpoint directory or GGUF file; "": the plan's model's own), dtype (the compute dtype; "":
    the checkpoint's), seed, threads (torch); time_scale (a factor > 0), plan (cost-model); extra: ``(dest, value)``
    pairs of executor flags that no field here holds.
    """

    connect: str
    node_id: int = -1
    executor: str = "torch"
    device: str = "cpu"
    machine_type: str = ""
    checkpoint: str = ""
    dtype: str = ""
    seed: int = 0
    bind: str = "tcp://127.0.0.1:*"
    threads: int = 1
    time_scale: float = 1.0
    memory_bytes: int = 0
    plan: str = ""
    keys: str = ""
    key_name: str = ""
    insecure: bool = False
    advertise: str = ""
    gather: float = 0.1
    extra: tuple[tuple[str, Any], ...] = ()

    def check(self) -> None:
        """Raise ConfigError naming the flag of the first bad option."""
        from .executors.registry import executor_entry

        entry = executor_entry(self.executor, "--executor")
        if entry.needs_profile and not self.machine_type:
            raise ConfigError("<argument>", "--machine-type", f"the {entry.name} executor needs the machine type it emulates")
        if not self.connect.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError("<argument>", "--connect", f"expected a ZeroMQ address like tcp://HOST:PORT, got {self.connect!r}")
        if not self.time_scale > 0:
            raise ConfigError("<argument>", "--time-scale", "must be > 0")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError("<argument>", "--device", f"unknown device {self.device!r}; use cpu or cuda")

    @property
    def gpu(self) -> str:
        """The machine type it registers as."""
        return self.machine_type or ("CPU" if self.device == "cpu" else "CUDA")

    def values(self) -> dict[str, Any]:
        """Every option by its flag's dest (the fields, then ``extra``): what an executor reads."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out


# --- host (the runtime's coordinator process) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostSettings:
    """How the runtime's host (``helix_async.runtime.host_main.HostServer``) serves; the ``host``
    command builds it from its flags (docs/runtime.md).

    listen: the inbox address workers connect to (ZeroMQ endpoint; port ``*``: any free one).
    scheduler: the routing policy, by its name in ``helix_async.routing.policies`` (one the runtime
    runs). kv: the KV expectation at admission. admission_capacity: requests that may wait for admission
    (beyond: rejected, HTTP 429). log_dir: where the run's logs are written at shutdown (None:
    none). emulate_time_scale: the cost-model emulation (workers price batches instead of computing
    them): hold the host's messages back by its links' modelled transfer times, slowed by this
    factor (None: off). recovery_timeout: seconds a request moved off a lost worker may wait for a
    live route before it fails. shutdown_grace: seconds in-flight requests may finish at shutdown.
    migration: reschedule running requests by live KV migration (MaxFlow;
    ``helix_async.routing.migration``, docs/migration.md).

    A value out of range raises ConfigError naming the field.

    Link health: a link whose heartbeat round trip passes ``slow_link_rtt`` seconds, or that
    resends ``lossy_link_retries`` messages between two reports, is degraded: its flow is capped at
    ``link_degrade_factor`` times what it carried (0 < factor <= 1); ``link_recover_s`` seconds
    without trouble restore it.
    """

    listen: str = "tcp://127.0.0.1:*"
    scheduler: str = "maxflow"
    kv: KVExpectation = KV_ONLINE
    admission_capacity: int = 4096
    log_dir: str | None = None
    emulate_time_scale: float | None = None
    recovery_timeout: float = 60.0
    shutdown_grace: float = 10.0
    slow_link_rtt: float = 1.0
    lossy_link_retries: int = 8
    link_degrade_factor: float = 0.25
    link_recover_s: float = 30.0
    migration: bool = False

    def __post_init__(self) -> None:
        positive = {"admission_capacity": self.admission_capacity, "recovery_timeout": self.recovery_timeout,
                    "slow_link_rtt": self.slow_link_rtt, "lossy_link_retries": self.lossy_link_retries,
                    "link_recover_s": self.link_recover_s}
        if self.emulate_time_scale is not None:
            positive["emulate_time_scale"] = self.emulate_time_scale
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError("<HostSettings>", name, f"must be > 0, got {value!r}")
        if not 0 < self.link_degrade_factor <= 1:
            raise ConfigError("<HostSettings>", "link_degrade_factor", f"must be in (0, 1], got {self.link_degrade_factor!r}")
        if not self.shutdown_grace >= 0:
            raise ConfigError("<HostSettings>", "shutdown_grace", f"must be >= 0, got {self.shutdown_grace!r}")
