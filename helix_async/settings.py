"""Settings objects: each owns its defaults, once.

The CLI builds these from its flags and passes them down; library code takes a settings object
instead of restating a default or a long keyword list. A settings object is a frozen value: to
change one field, ``dataclasses.replace`` it.

Sections below belong to the parts that read them (KV expectation: admission, planner and
simulator alike; search: the planners; simulation: the served planner's simulations and the
simulator's CLI; worker and host: the runtime's processes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import ConfigError

if TYPE_CHECKING:
    from .ids import NodeRef
    from .worker import BatchLimits

__all__ = ["HostSettings", "KVExpectation", "KV_OFFLINE", "KV_ONLINE", "kv_for_mode"]
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
    same layer-by-layer schedule in fewer events).

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

    def __post_init__(self) -> None:
        for name in ("kv_capacity", "activation_bytes", "token_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError("<WorkerSettings>", name, f"must be an integer >= 0, got {value!r}")
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
    the bound one).  The executors' own options (their flags in the registry): checkpoint, dtype,
    seed, threads (torch); time_scale (a factor > 0), plan (cost-model); extra: ``(dest, value)``
    pairs of executor flags that no field here holds.
    """

    connect: str
    node_id: int = -1
    executor: str = "torch"
    device: str = "cpu"
    machine_type: str = ""
    checkpoint: str = ""
    dtype: str = "float32"
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
