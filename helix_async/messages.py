"""Wire messages between host and workers: frozen, slotted dataclasses with an ``IntEnum`` tag.

Every message type knows its tag (``TAG``), its snake-case name (``NAME``) and its field order
(``FIELDS``), which is also its msgpack array layout on the wire (see ``helix_async.codec``).
Construct messages with keywords; construction does not validate (it sits on the hot path) —
``codec.encode`` does, so a message that encodes decodes to an equal message.

Conventions for every message:

* ids (request, query, node, plan) are non-negative ints; ``-1`` only where a field says so.
* layer ranges are half-open ``[start, end)`` layer indices of the model.
* times (``sent_at``, ``now``) are float seconds of *loop time* on the sender's ``Clock`` (not
  wall-clock time); a receiver compares them only with its own clock when both run on one
  virtual loop, or uses them to match a reply to a request.
* tensors are numpy arrays (C-contiguous, little-endian; torch CPU tensors are accepted on encode
  when torch is loaded) and travel as separate raw frames; decoding returns numpy arrays that
  share memory with the received frames. Messages holding tensors compare tensors by dtype,
  shape and bytes, and are not hashable.
* modelled payloads: a work message may stand for a payload it does not carry (the simulator, or
  a cost-model executor emulating a real model): ``payload_bytes > 0`` in place of its hidden
  states or token ids gives that payload's size. Encoded, such a message carries one frame of
  ``payload_bytes`` zero bytes in their place (a real network moves the bytes a real run would);
  decoded, it has ``payload_bytes`` again and no tensors. ``codec.wire_size(msg)`` gives the bytes
  a message takes on the wire without encoding it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, ClassVar

import numpy as np

from .ids import Route
from .sampling import SamplingParams


class MsgType(IntEnum):
    """One-byte tag sent as frame 0 of every message (0 is never valid, as in the prototype)."""

    REGISTER = 1
    ASSIGN_LAYERS = 2
    PROMPT_WORK = 3
    DECODE_WORK = 4
    ACTIVATIONS = 5
    TOKEN_RESULT = 6
    HEARTBEAT = 7
    CANCEL = 8
    ERROR = 9
    SHUTDOWN = 10
    FEEDBACK = 11
    NODE_STATS = 12
    MIGRATE_RESERVE = 13
    MIGRATE_START = 14
    MIGRATE_KV = 15
    MIGRATE_STATUS = 16
    MIGRATE_FINISH = 17
    MIGRATE_ABORT = 18


class ErrorCode(IntEnum):
    """Well-known values of ``Error.code`` (the field is a plain int so newer codes still decode)."""

    BAD_MESSAGE = 1  # a peer's message failed to decode (see codec.DropCounter)
    UNKNOWN_REQUEST = 2  # work or a cancel for a request id this node does not know
    NOT_ASSIGNED = 3  # work for layers this node does not hold under the current plan
    OUT_OF_MEMORY = 4  # memory ran out: a KV cache full (the request was dropped at this node), or
    #                   a worker's layers do not fit its device (request_id -1, before it serves)
    SHUTTING_DOWN = 5  # the node no longer accepts work
    INTERNAL = 6  # a bug; the text says more
    LOAD_FAILED = 7  # a worker could not load its layers for another reason than memory (a bad or
    #                  missing checkpoint, an unknown dtype, no CUDA): request_id -1, the text says why


#: One next hop in AssignLayers: (node id, data-plane address, first layer, end layer).
Peer = tuple[int, str, int, int]
#: A tensor as held in a message: numpy.ndarray (decoded messages), or a torch CPU tensor on encode.
Tensor = Any


def as_ndarray(t: object) -> np.ndarray | None:
    """``t`` as a numpy array without copying: numpy arrays as is, torch CPU tensors through
    ``detach().numpy()`` (only when torch is already imported); None for anything else."""
    if isinstance(t, np.ndarray):
        return t
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(t, torch.Tensor):
        if t.device.type != "cpu":
            return None
        try:
            return t.detach().numpy()
        except (TypeError, RuntimeError):  # e.g. bfloat16 has no numpy dtype
            return None
    return None


def _tensor_equal(a: object, b: object) -> bool:
    if a is b:
        return True
    x, y = as_ndarray(a), as_ndarray(b)
    if x is None or y is None:
        return False
    # bytes, not values: NaN payloads round-trip and must compare equal
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _eq_with_tensors(self: Any, other: object) -> bool:
    names: tuple[str, ...] = self.FIELDS
    if other.__class__ is not self.__class__:
        return NotImplemented
    for name in names:
        a, b = getattr(self, name), getattr(other, name)
        if name == "tensors":
            if len(a) != len(b) or not all(_tensor_equal(x, y) for x, y in zip(a, b, strict=True)):
                return False
        elif a != b:
            return False
    return True


class _Message:
    """Common class attributes (no instance state: keeps the subclasses' ``__slots__`` tight)."""

    __slots__ = ()
    TAG: ClassVar[MsgType]
    NAME: ClassVar[str]
    FIELDS: ClassVar[tuple[str, ...]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Register(_Message):
    """Worker → host, first message after connecting.

    node_id: the node's id in the cluster file, or -1 to let the host pick one by ``name``.
    name: node name in the cluster file. machine_type: GPU type as in the profiles ("A100", "T4x2").
    address: the worker's data-plane endpoint ("tcp://10.0.0.5:6001").
    num_gpus: GPUs on the node. gpu_memory_bytes: total GPU memory, bytes.
    capabilities: executor features, e.g. ("torch", "fp16") or ("cost-model",).
    """

    TAG: ClassVar[MsgType] = MsgType.REGISTER
    NAME: ClassVar[str] = "register"
    node_id: int
    name: str
    machine_type: str
    address: str
    num_gpus: int
    gpu_memory_bytes: int
    capabilities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class AssignLayers(_Message):
    """Host → worker: the layers to load and where to send results under plan ``plan_id``.

    start, end: layer range [start, end) of ``model`` (start < end).
    plan_id: version of the plan (increases; work stamped with an older plan may be refused).
    next_hops: (node id, address, start, end) of every node this one may forward to; the
    last-stage nodes list the host. prev_nodes: ids of the nodes that may send work here.
    """

    TAG: ClassVar[MsgType] = MsgType.ASSIGN_LAYERS
    NAME: ClassVar[str] = "assign_layers"
    node_id: int
    model: str
    start: int
    end: int
    plan_id: int
    next_hops: tuple[Peer, ...]
    prev_nodes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class PromptWork(_Message):
    """Prompt phase of a request, sent along its route one stage at a time.

    request_id: runtime id of the request (unique per host run; later messages carry it).
    query_id: id of the query in the workload/trace it came from (logs and route files).
    route: the request's route (``helix_async.ids.Route``, as ``FlowRouter.route`` returns it):
    its compute stages (node, start, end), contiguous in layers (stage i starts where i-1 ends),
    1..Limits.max_route_stages long; the sink is implicit (the last stage returns to the host).
    stage: index in ``route`` of the receiving stage.
    num_tokens: prompt length in tokens (>= 1).
    token_ids: the prompt's token ids when the receiver runs the first layers (len == num_tokens),
    else empty and ``tensors`` holds the hidden states (for example one (num_tokens, hidden) array).
    max_tokens: most output tokens to generate (excluding the prompt).
    sent_at: loop time (s) when the sender handed the message to its transport.
    payload_bytes: 0, or the size in bytes of a *modelled* payload (see the module docstring) that
    stands for the hidden states (empty ``tensors``) or, at the first stage, the token ids (empty
    ``token_ids``; ``num_tokens`` still counts them). Exactly one of token_ids, tensors and
    payload_bytes is given.
    temperature, top_p, seed, top_k, min_p, presence_penalty, frequency_penalty,
    repetition_penalty, min_tokens, stop_token_ids: how the last stage chooses the request's
    tokens, the fields of :class:`helix_async.sampling.SamplingParams` (its doc gives their ranges
    and meaning; :meth:`sampling` builds it, :func:`sampling_fields` gives them back as keywords).
    logprobs: -1 for none, else how many top log-probabilities each token result carries (0..
    ``MAX_LOGPROBS``; the chosen token's comes with them).
    context_ids: the request's token ids for a later last stage that needs them (empty unless the
    sampling counts them: a repetition penalty, or the presence and frequency penalties of a
    migrated request), so empty at the first stage, which has them in ``token_ids``; else exactly
    ``num_tokens`` ids. The first stage copies its token ids here when it forwards the prompt.
    generated: how many of the request's last tokens it had generated already (0, except after a
    migration, whose prompt is its input plus the tokens generated so far): the penalties and
    ``min_tokens`` count them as output, and the seeded draws go on from there (< num_tokens).
    priority: the request's priority, a lower number more urgent (``Host.submit``); the workers
    batch and preempt by it (docs/runtime.md, "Priorities").
    """

    TAG: ClassVar[MsgType] = MsgType.PROMPT_WORK
    NAME: ClassVar[str] = "prompt_work"
    request_id: int
    query_id: int
    route: Route
    stage: int
    num_tokens: int
    token_ids: tuple[int, ...]
    max_tokens: int
    sent_at: float
    tensors: tuple[Tensor, ...] = ()
    payload_bytes: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int = -1
    context_ids: tuple[int, ...] = ()
    generated: int = 0
    priority: int = 0

    __eq__ = _eq_with_tensors

    def sampling(self) -> SamplingParams:
        """The request's sampling parameters (raises ValueError when the fields break their rules,
        which a decoded message never does)."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_tokens=self.min_tokens,
            stop_token_ids=self.stop_token_ids,
            logprobs=None if self.logprobs < 0 else self.logprobs,
        )

    @property
    def needs_context(self) -> bool:
        """The last stage needs the request's token ids (``context_ids``) to sample: a repetition
        penalty counts the prompt's; after a migration the presence and frequency penalties count
        the tokens generated before it."""
        return self.repetition_penalty != 1.0 or (
            self.generated > 0 and (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)
        )


def sampling_fields(params: SamplingParams) -> dict[str, Any]:
    """``params`` as the keyword arguments of :class:`PromptWork`'s sampling fields."""
    return {
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "seed": int(params.seed),
        "top_k": int(params.top_k),
        "min_p": float(params.min_p),
        "presence_penalty": float(params.presence_penalty),
        "frequency_penalty": float(params.frequency_penalty),
        "repetition_penalty": float(params.repetition_penalty),
        "min_tokens": int(params.min_tokens),
        "stop_token_ids": tuple(int(t) for t in params.stop_token_ids),
        "logprobs": -1 if params.logprobs is None else int(params.logprobs),
    }


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class DecodeWork(_Message):
    """One decode step of a request, following the route fixed at admission (its KV cache).

    route, stage: as in PromptWork. context_len: tokens in the sequence including this step's
    input token (its position is context_len - 1), so the first decode after an n-token prompt
    has context_len n + 1. token_id: the input token when the receiver runs the first layers,
    else -1 and ``tensors`` holds the hidden state.
    sent_at: loop time (s) when the sender handed the message to its transport.
    payload_bytes: 0, or the size in bytes of a *modelled* payload (see the module docstring) that
    stands for the hidden state (empty ``tensors``) or, at the first stage, the token id (token_id
    -1). Exactly one of a token id >= 0, tensors and payload_bytes is given.
    """

    TAG: ClassVar[MsgType] = MsgType.DECODE_WORK
    NAME: ClassVar[str] = "decode_work"
    request_id: int
    route: Route
    stage: int
    context_len: int
    token_id: int
    sent_at: float
    tensors: tuple[Tensor, ...] = ()
    payload_bytes: int = 0

    __eq__ = _eq_with_tensors


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Activations(_Message):
    """Tensors of a request not tied to a work message (for example hidden states sent ahead of
    the work header, or a KV/activation hand-off): at least one tensor.

    stage: route stage index the tensors belong to. num_tokens: tokens they cover.
    sent_at: loop time (s) when the sender handed the message to its transport.
    """

    TAG: ClassVar[MsgType] = MsgType.ACTIVATIONS
    NAME: ClassVar[str] = "activations"
    request_id: int
    stage: int
    num_tokens: int
    sent_at: float
    tensors: tuple[Tensor, ...]

    __eq__ = _eq_with_tensors


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenResult(_Message):
    """Last stage → host: the token generated by one prompt or decode step.

    context_len: context length of the step that produced the token (the prompt length for the
    first token, then the decode's context_len). finished: the worker stopped the request (EOS);
    the host also stops it at max_tokens. sent_at: sender's loop time (s).
    route: the route the step took (as in PromptWork), or empty. Per-hop schedulers (Swarm,
    Random, shortest queue) pick each next hop at the sending node, so only the last stage knows
    the whole route: it fills it in, and the host stamps it on the request's later decodes.
    logprobs: empty unless the request asked for log-probabilities (``PromptWork.logprobs`` >= 0);
    else ``(token id, logprob)`` pairs: the chosen token's first (its id is ``token_id``), then the
    ``logprobs`` most likely tokens', best first. A logprob is the natural log of a probability
    (finite, <= 0).
    """

    TAG: ClassVar[MsgType] = MsgType.TOKEN_RESULT
    NAME: ClassVar[str] = "token_result"
    request_id: int
    token_id: int
    context_len: int
    finished: bool
    sent_at: float
    route: Route = ()
    logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(_Message):
    """Liveness, both directions. seq: increases by one per heartbeat of the sender;
    now: sender's loop time (s)."""

    TAG: ClassVar[MsgType] = MsgType.HEARTBEAT
    NAME: ClassVar[str] = "heartbeat"
    node_id: int
    seq: int
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel(_Message):
    """Host → workers on the route: drop the request and free its KV cache."""

    TAG: ClassVar[MsgType] = MsgType.CANCEL
    NAME: ClassVar[str] = "cancel"
    request_id: int
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Error(_Message):
    """A failure reported to the peer. request_id: the request concerned, or -1 for none;
    code: an ``ErrorCode`` value (any int >= 0 decodes); text: for people."""

    TAG: ClassVar[MsgType] = MsgType.ERROR
    NAME: ClassVar[str] = "error"
    request_id: int
    code: int
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Shutdown(_Message):
    """Host → workers (or a worker announcing its exit): stop after finishing in-flight sends."""

    TAG: ClassVar[MsgType] = MsgType.SHUTDOWN
    NAME: ClassVar[str] = "shutdown"
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Feedback(_Message):
    """Receiver of a hop → its sender (the Swarm scheduler): how long the hop took.

    request_id: the request whose work made the hop. node_id: the node that measured (the
    receiver). delay: seconds from the sender's send (the work's ``sent_at``) to the work being
    ready to forward at the receiver (finite, >= 0); the sender folds it into its estimate (EMA)
    for that next hop. sent_at: the receiver's loop time (s) when it sent this message.
    """

    TAG: ClassVar[MsgType] = MsgType.FEEDBACK
    NAME: ClassVar[str] = "feedback"
    request_id: int
    node_id: int
    delay: float
    sent_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeStats(_Message):
    """Worker → host, about once a second while serving: what the host's metrics show per node.

    node_id: the sender. now: its loop time (s). kv_used, kv_capacity: KV cache entries (tokens x
    layers) in use and in all. queued: work items waiting at the node. peers: the nodes it sends to
    (-1: the host); bytes_out: bytes sent to each (cumulative, same order). bad_frames: frames and
    messages it dropped as malformed (cumulative). retried: messages sent again to each peer
    (cumulative); rtt_us: each link's smoothed heartbeat round trip, microseconds (0: not measured).
    batches, busy_s: batches the node has run, and the seconds its clock counted from their starts
    to their ends (cumulative; the worker's ``WorkerStats.batches`` and ``busy_time``).
    """

    TAG: ClassVar[MsgType] = MsgType.NODE_STATS
    NAME: ClassVar[str] = "node_stats"
    node_id: int
    now: float
    kv_used: int
    kv_capacity: int
    queued: int
    peers: tuple[int, ...] = ()
    bytes_out: tuple[int, ...] = ()
    bad_frames: int = 0
    retried: tuple[int, ...] = ()
    rtt_us: tuple[int, ...] = ()
    batches: int = 0
    busy_s: float = 0.0


# ---- live KV migration of one (request, stage) (docs/migration.md) ----------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrateReserve(_Message):
    """Host → the target node Y: take over stage ``stage`` of request ``request_id``.

    route: the request's route once it has moved (Y at index ``stage``). context_len: KV positions
    the source holds now (Y reserves them). max_context: the request's context when its last token
    is made (Y frees the request there, as the source would). priority: the request's.
    source: the node the KV comes from (Y accepts ``MigrateKV`` for this request from it only);
    address: where the source listens, for Y's acknowledgements ("" in the simulator).
    Y answers ``MigrateStatus`` ``RESERVED`` or ``REFUSED``."""

    TAG: ClassVar[MsgType] = MsgType.MIGRATE_RESERVE
    NAME: ClassVar[str] = "migrate_reserve"
    request_id: int
    route: Route
    stage: int
    context_len: int
    max_context: int
    priority: int
    source: int
    address: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrateStart(_Message):
    """Host → the source node X: copy request ``request_id``'s KV to node ``target`` while it keeps
    decoding here (pre-copy). address: where ``target`` listens ("" in the simulator: the network
    knows). X answers ``MigrateStatus`` ``TAIL`` when what is left to copy is short."""

    TAG: ClassVar[MsgType] = MsgType.MIGRATE_START
    NAME: ClassVar[str] = "migrate_start"
    request_id: int
    target: int
    address: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrateKV(_Message):
    """X → Y: the keys and values of request ``request_id`` for positions ``[first, first + count)``
    of the stage's layers. tensors: one array (layers, 2, kv_heads, count, head_dim), or none with
    ``payload_bytes`` standing for it (a cost-model executor). final: X stopped the request and
    this chunk is its last (the stop-and-copy); Y then tells the host it holds everything."""

    TAG: ClassVar[MsgType] = MsgType.MIGRATE_KV
    NAME: ClassVar[str] = "migrate_kv"
    request_id: int
    first: int
    count: int
    final: bool
    sent_at: float
    tensors: tuple[Tensor, ...] = ()
    payload_bytes: int = 0

    __eq__ = _eq_with_tensors


class MigrateState(IntEnum):
    """``MigrateStatus.state``: who says it, to whom, and when."""

    RESERVED = 1  # Y → host: KV reserved, send the source its MigrateStart
    REFUSED = 2  # Y → host (no room, layers not held, unknown source) or X → host (cannot copy)
    RECEIVED = 3  # Y → X: positions up to ``upto`` arrived (the copy's flow control)
    TAIL = 4  # X → host: what is left to copy is short; stop the request at its next quiet moment
    DONE = 5  # Y → host: Y holds positions [0, upto) and owns the request's stage


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrateStatus(_Message):
    """A step of a migration reported by X or Y (see :class:`MigrateState`). node_id: the sender;
    upto: KV positions concerned (-1 where none); text: why, for a refusal."""

    TAG: ClassVar[MsgType] = MsgType.MIGRATE_STATUS
    NAME: ClassVar[str] = "migrate_status"
    request_id: int
    node_id: int
    state: int
    upto: int = -1
    text: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrateFinish(_Message):
    """Host → X, at the request's quiet moment (its next decode held back): send the last positions
    with ``final`` set; the request computes nothing here until the host says otherwise."""

    TAG: ClassVar[MsgType] = MsgType.MIGRATE_FINISH
    NAME: ClassVar[str] = "migrate_finish"
    request_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrateAbort(_Message):
    """Host → X and Y: the migration is off. X stops copying and keeps the request; Y drops what it
    reserved and received."""

    TAG: ClassVar[MsgType] = MsgType.MIGRATE_ABORT
    NAME: ClassVar[str] = "migrate_abort"
    request_id: int
    reason: str = ""


Message = (
    Register
    | AssignLayers
    | PromptWork
    | DecodeWork
    | Activations
    | TokenResult
    | Heartbeat
    | Cancel
    | Error
    | Shutdown
    | Feedback
    | NodeStats
    | MigrateReserve
    | MigrateStart
    | MigrateKV
    | MigrateStatus
    | MigrateFinish
    | MigrateAbort
)

#: Message class per tag.
MESSAGE_TYPES: dict[MsgType, type[_Message]] = {
    cls.TAG: cls
    for cls in (
        Register,
        AssignLayers,
        PromptWork,
        DecodeWork,
        Activations,
        TokenResult,
        Heartbeat,
        Cancel,
        Error,
        Shutdown,
        Feedback,
        NodeStats,
        MigrateReserve,
        MigrateStart,
        MigrateKV,
        MigrateStatus,
        MigrateFinish,
        MigrateAbort,
    )
}

for _cls in MESSAGE_TYPES.values():
    _cls.FIELDS = tuple(f.name for f in fields(_cls))  # type: ignore[arg-type]
del _cls


def positional_constructor(cls: type[_Message]) -> Callable[..., Any]:
    """A constructor of ``cls`` taking every field positionally, in ``cls.FIELDS`` order.

    For the simulator's hot path, which builds millions of work messages: a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__``; this sets the slots directly and
    is about 2.5 times faster.  No defaults and no validation (neither does ``__init__``); the
    result equals the keyword-built message (tests/test_messages_fast.py).
    """
    names = cls.FIELDS
    ns: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    for i, name in enumerate(names):
        ns[f"_s{i}"] = cls.__dict__[name].__set__  # the slot's member descriptor
    body = "\n".join(f"    _s{i}(o, {name})" for i, name in enumerate(names))
    src = f"def make({', '.join(names)}):\n    o = _new(_cls)\n{body}\n    return o\n"
    exec(src, ns)  # noqa: S102 - generated from the class's own field names, as dataclasses does
    make = ns["make"]
    make.__qualname__ = make.__name__ = f"make_{cls.NAME}"
    make.__doc__ = f"``{cls.__name__}({', '.join(names)})``, positional (see positional_constructor)."
    return make


#: Positional constructors of the messages the simulator builds per hop.
make_prompt_work = positional_constructor(PromptWork)
make_decode_work = positional_constructor(DecodeWork)
make_token_result = positional_constructor(TokenResult)
make_feedback = positional_constructor(Feedback)

__all__ = [
    "make_decode_work",
    "make_feedback",
    "make_prompt_work",
    "make_token_result",
    "positional_constructor",
    "sampling_fields",
    "MESSAGE_TYPES",
    "Activations",
    "AssignLayers",
    "Cancel",
    "DecodeWork",
    "Error",
    "ErrorCode",
    "Feedback",
    "Heartbeat",
    "Message",
    "MigrateAbort",
    "MigrateFinish",
    "MigrateKV",
    "MigrateReserve",
    "MigrateStart",
    "MigrateState",
    "MigrateStatus",
    "NodeStats",
    "MsgType",
    "Peer",
    "PromptWork",
    "Register",
    "Shutdown",
    "Tensor",
    "TokenResult",
    "as_ndarray",
]
