"""Analytical per-layer profiles and node settings from a GPU's datasheet and a model's shape.

For a GPU type nobody measured, the time of one transformer layer on a batch is a roofline per
kernel group (docs/profiles.md, "Analytical profiles"):

* the dense projections (q/k/v, o, gate/up, down) read the layer's weights once and do
  2 FLOPs per weight per token: ``max(weight bytes / bandwidth, FLOPs / (efficiency x peak))``;
* attention reads the batch's KV cache (decode) or writes it (prompt) and does its own FLOPs,
  the same ``max`` on its own (it is a separate kernel: the two do not overlap);
* the element-wise kernels (norms, RoPE, activation, residual adds) stream the activations;
* a tensor-parallel group all-reduces the hidden state twice per layer over its link;
* every kernel costs a fixed launch time.

Weights, KV and activations are in the type's compute dtype: 16 bits on a GPU (what a GPU serves a
model in), float32 on a CPU core (what the torch executor computes in there). The one calibrated
number is the type's ``efficiency`` (datasheet table, :mod:`.gpus`); memory runs at the datasheet
bandwidth. The tables are produced on the grid of the measured profiles we ship
(docs/original.md §3.2), so they are read exactly like measured ones.

Node settings (KV blocks, batch limits, most layers) follow vLLM's memory rules and the original's
half-VRAM rule for weights on a GPU (docs/original.md §3.3; ours in docs/profiles.md), and the
``profile`` command's defaults on a CPU core (a fixed KV budget, its batch limits).

Units: seconds, bytes, FLOPs, bytes/s, FLOP/s; token x layer entries for KV capacities.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .gpus import GpuType

if TYPE_CHECKING:
    from ..model import DatasetConstants, ModelSpec

__all__ = [
    "BYTES",
    "CPU_DECODE_MAX_TOKENS",
    "CPU_KV_BYTES",
    "CPU_PROMPT_MAX_REQUESTS",
    "CPU_PROMPT_MAX_TOKENS",
    "DECODE_CAP",
    "LAUNCH_S",
    "MEMORY_UTILIZATION",
    "PROMPT_MAX_REQUESTS",
    "RESERVE_PER_GPU",
    "AnalyticalSettings",
    "LayerShape",
    "analytical_settings",
    "analytical_tables",
    "decode_grid",
    "fit_efficiency",
    "layer_time",
    "log_errors",
    "prompt_grid",
    "typical_constants",
]

#: bytes per weight, KV and activation element on a GPU: the 16-bit formats the datasheet peak is
#: for (a type's own: ``GpuType.element_bytes``, 4 on a CPU core)
BYTES = 2
#: kernels one LLaMA layer launches: 2 norms, qkv, RoPE, attention, o, gate/up, activation, down,
#: and the residual adds fused as one; a tensor-parallel group adds its 2 all-reduces
KERNELS_PER_LAYER = 10
#: seconds a kernel costs however little it does (launch and tail; a few microseconds on CUDA)
LAUNCH_S = 5e-6
#: vLLM's default gpu_memory_utilization: the share of VRAM it takes for weights, activations, KV
MEMORY_UTILIZATION = 0.9
#: bytes per GPU that go neither to weights nor to the KV cache (CUDA context, activation workspace)
RESERVE_PER_GPU = 1.5e9
#: vLLM's default max_num_seqs: the most sequences decoding in one batch
DECODE_CAP = 256
#: prompts of the dataset's longest length per batch (vLLM's default max_num_batched_tokens = 2048)
PROMPT_MAX_REQUESTS = 1
#: a CPU worker's node settings: the ``profile`` command's defaults (its flags --kv-bytes,
#: --prompt-max-requests, --prompt-max-tokens, --decode-max-tokens), whatever the layer count
CPU_KV_BYTES = 256 * 2**20
CPU_PROMPT_MAX_REQUESTS = 4
CPU_PROMPT_MAX_TOKENS = 2048
CPU_DECODE_MAX_TOKENS = 128


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer's shape: widths, heads and which biases it has.

    hidden, intermediate: widths. heads, kv_heads, head_dim: attention. bias_params: parameters
    of its biases (q/k/v, o, MLP; 0 for LLaMA-1/2).
    """

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    bias_params: int = 0

    @classmethod
    def of(cls, spec: ModelSpec) -> LayerShape:
        """The shape of ``spec``'s layers (biases from its ``arch`` when it was read from files)."""
        arch = spec.arch
        bias = 0
        if arch is not None:
            q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
            bias += (q + 2 * kv) if arch.qkv_bias else 0
            bias += arch.hidden_size if arch.o_bias else 0
            bias += (2 * arch.intermediate_size + arch.hidden_size) if arch.mlp_bias else 0
        return cls(spec.hidden_size, spec.intermediate_size, spec.num_attention_heads, spec.num_key_value_heads,
                   spec.head_dim, bias)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def matmul_params(self) -> int:
        """Weights of the layer's matrix products (q/k/v, o, gate/up/down)."""
        h = self.hidden
        return h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h + 3 * h * self.intermediate

    def weight_bytes(self, nbytes: int = BYTES) -> int:
        """Bytes of the layer's weights at ``nbytes`` per element: projections, biases and the two norms."""
        return nbytes * (self.matmul_params + self.bias_params + 2 * self.hidden)

    def kv_bytes_per_token(self, nbytes: int = BYTES) -> int:
        """Bytes one token's keys and values take in this layer at ``nbytes`` per element."""
        return 2 * self.kv_dim * nbytes

    def elementwise_bytes(self, nbytes: int = BYTES) -> tuple[int, int]:
        """Bytes per token the element-wise kernels move at ``nbytes`` per element, as (replicated
        on every GPU of a tensor-parallel group, split over them): the norms and residual adds on
        the hidden state (read and write, twice), RoPE on q and k, the gated activation (read 2,
        write 1)."""
        return nbytes * 10 * self.hidden, nbytes * (2 * (self.q_dim + self.kv_dim) + 3 * self.intermediate)


def layer_time(
    shape: LayerShape, gpu: GpuType, *, prompt_tokens: int = 0, decode_seqs: int = 0, prompt_len: int = 750,
    context: float = 870.0, efficiency: float | None = None,
) -> float:
    """Seconds one layer takes on ``gpu`` for ``prompt_tokens`` prompt tokens (requests of
    ``prompt_len`` tokens, the last one shorter) or ``decode_seqs`` sequences decoding one token
    each with ``context`` tokens cached. ``efficiency`` overrides the type's factor (for fitting).

    One phase at a time: the simulator adds a mixed batch's two (docs/original.md §3.2).
    """
    if prompt_tokens and decode_seqs:
        raise ValueError("layer_time takes a prompt batch or a decode batch, not both")
    tokens = prompt_tokens + decode_seqs
    if tokens == 0:
        return 0.0
    n = gpu.count
    nb = gpu.element_bytes
    eta = gpu.efficiency if efficiency is None else efficiency
    peak = eta * gpu.flops
    bw = gpu.mem_bw
    dense = max(shape.weight_bytes(nb) / n / bw, 2.0 * shape.matmul_params * tokens / n / peak)
    if prompt_tokens:
        full, rest = divmod(prompt_tokens, prompt_len)
        # causal attention of each request of s tokens: QK^T and PV over half the s x s square
        attn_flops = 2.0 * shape.q_dim * (full * prompt_len**2 + rest**2)
        attn_bytes = float(prompt_tokens * shape.kv_bytes_per_token(nb))  # the new keys and values written
    else:
        attn_flops = 4.0 * shape.q_dim * context * decode_seqs
        attn_bytes = decode_seqs * context * shape.kv_bytes_per_token(nb)  # every cached entry read once
    attn = max(attn_bytes / n / bw, attn_flops / n / peak)
    rep, split = shape.elementwise_bytes(nb)
    elementwise = tokens * (rep + split / n) / bw
    t = dense + attn + elementwise + KERNELS_PER_LAYER * LAUNCH_S
    if n > 1:
        # two ring all-reduces of the hidden state: each GPU sends 2 (n - 1) / n of it
        t += 2 * (2.0 * (n - 1) / n * tokens * shape.hidden * nb / gpu.link_bw + LAUNCH_S)
    return t


def prompt_grid(upto: int = 15000) -> tuple[int, ...]:
    """The shipped prompt grid (docs/original.md §3.2): 0, 250, 500, ... up to ``upto`` tokens."""
    return tuple(range(0, upto + 1, 250))


def decode_grid(upto: int = 800) -> tuple[int, ...]:
    """The shipped decode grid (docs/original.md §3.2): 0, 2, ..., 20, 25, ..., 100, 120, ..., 800
    sequences, continued by 100 up to ``upto`` (at least 800)."""
    grid = [*range(0, 21, 2), *range(25, 101, 5), *range(120, 801, 20)]
    top = 800
    while top < upto:
        top += 100
        grid.append(top)
    return tuple(grid)


def analytical_tables(
    shape: LayerShape, gpu: GpuType, consts: DatasetConstants, *, decode_upto: int = 800, prompt_upto: int = 15000,
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(prompt_x, prompt_s, decode_x, decode_s) on the shipped grids: seconds per layer.

    Prompts are requests of the dataset's mean input length; decodes have the dataset's mean
    context cached (mean input plus half the mean output) (docs/profiles.md).
    """
    plen = consts.avg_input_len
    ctx = consts.avg_input_len + consts.avg_output_len / 2
    px = prompt_grid(prompt_upto)
    dx = decode_grid(decode_upto)
    ps = tuple(layer_time(shape, gpu, prompt_tokens=x, prompt_len=plen, context=ctx) for x in px)
    ds = tuple(layer_time(shape, gpu, decode_seqs=x, prompt_len=plen, context=ctx) for x in dx)
    return tuple(map(float, px)), ps, tuple(map(float, dx)), ds


@dataclass(frozen=True)
class AnalyticalSettings:
    """Node settings of a GPU type derived from its VRAM (each tuple indexed by ``k - 1``): the
    columns of node_settings.csv (docs/original.md §3.3)."""

    max_layers: int
    vllm_blocks: tuple[int, ...]
    kv_capacity: tuple[int, ...]
    prompt_max_requests: tuple[int, ...]
    prompt_max_tokens: tuple[int, ...]
    decode_max_tokens: tuple[int, ...]
    decode_max_context: tuple[int, ...]


def analytical_settings(shape: LayerShape, gpu: GpuType, num_layers: int, consts: DatasetConstants) -> AnalyticalSettings | None:
    """vLLM-like node settings for ``gpu`` holding 1..max layers, or None when not even one layer
    fits (docs/profiles.md, "Node settings"):

    * most layers: the weights within half the VRAM (the original's rule), at most the model's;
    * KV bytes for k layers: ``0.9 x VRAM - k x weights - 1.5 GB per GPU``, in blocks of 16
      tokens per layer; a layer count is allowed only while one longest prompt fits;
    * one longest prompt per batch; at most 256 decoding sequences, and no more than the KV cache
      holds at 1000 tokens of context each.

    A CPU core (``gpu.device == "cpu"``) gets what the ``profile`` command writes for one by
    default, so an analytical CPU type and a measured one look alike: every layer count up to the
    model's, a KV budget of ``CPU_KV_BYTES`` whatever the count (in float32 entries), 4 prompts or
    2048 tokens and 128 decoding sequences per batch; a layer count only while one longest prompt
    fits a layer's cache, as on a GPU.
    """
    nb = gpu.element_bytes
    block = consts.vllm_block_size
    per_block = block * shape.kv_bytes_per_token(nb)
    if gpu.device == "cpu":
        return _cpu_settings(per_block, num_layers, consts)
    w = shape.weight_bytes(nb)
    vram = gpu.total_vram
    most = min(num_layers, int(vram // (2 * w)))
    blocks: list[int] = []
    for k in range(1, most + 1):
        kv = MEMORY_UTILIZATION * vram - k * w - gpu.count * RESERVE_PER_GPU
        b = int(kv // (per_block * k)) if kv > 0 else 0
        if b * block < consts.max_input_len:
            break
        blocks.append(b)
    if not blocks:
        return None
    most = len(blocks)
    dmt = tuple(max(1, min(DECODE_CAP, b * block // consts.decode_per_token_max_context)) for b in blocks)
    return AnalyticalSettings(
        max_layers=most,
        vllm_blocks=tuple(blocks),
        kv_capacity=tuple(block * b * (k + 1) for k, b in enumerate(blocks)),
        prompt_max_requests=(PROMPT_MAX_REQUESTS,) * most,
        prompt_max_tokens=(PROMPT_MAX_REQUESTS * consts.max_input_len,) * most,
        decode_max_tokens=dmt,
        decode_max_context=tuple(d * consts.decode_per_token_max_context for d in dmt),
    )


def _cpu_settings(per_block: int, num_layers: int, consts: DatasetConstants) -> AnalyticalSettings | None:
    block = consts.vllm_block_size
    blocks: list[int] = []
    for k in range(1, num_layers + 1):
        b = CPU_KV_BYTES // (per_block * k)
        if b * block < consts.max_input_len:
            break
        blocks.append(b)
    if not blocks:
        return None
    most = len(blocks)
    return AnalyticalSettings(
        max_layers=most,
        vllm_blocks=tuple(blocks),
        kv_capacity=tuple(block * b * (k + 1) for k, b in enumerate(blocks)),
        prompt_max_requests=(CPU_PROMPT_MAX_REQUESTS,) * most,
        prompt_max_tokens=(CPU_PROMPT_MAX_TOKENS,) * most,
        decode_max_tokens=(CPU_DECODE_MAX_TOKENS,) * most,
        decode_max_context=(CPU_DECODE_MAX_TOKENS * consts.decode_per_token_max_context,) * most,
    )


def typical_constants(max_layers: int, decode: Callable[[float], float], decode_max: float) -> tuple[int, int, float]:
    """(typical layers A, typical layers B, initial normalised performance) for a GPU type that
    has no hand-set ones (docs/profiles.md, "Typical-batch constants"): B is the most layers (as
    the original's tables), A two thirds of it rounded (ours), and the initial performance the
    token x layers per second of a 16-sequence decode batch (ours; the fixed point only needs the
    ratios between types to start from)."""
    b = max_layers
    a = max(1, math.floor(2 * b / 3 + 0.5))
    d = min(16.0, decode_max)
    return a, b, d / decode(d)


# ---- calibration ---------------------------------------------------------------------------------


def log_errors(
    shape: LayerShape, gpu: GpuType, consts: DatasetConstants, points: Iterable[tuple[str, float, float]],
    efficiency: float | None = None, *, prompt_len: int | None = None, context: float | None = None,
) -> list[float]:
    """log(predicted / measured) at each measured point ``(phase, x, seconds)`` (phase ``prompt``
    or ``decode``; points at x = 0 are skipped). Prompts are requests of ``prompt_len`` tokens and
    decodes have ``context`` tokens cached, as the profile was measured (default: the dataset's
    mean input, and mean input plus half the mean output)."""
    plen = consts.avg_input_len if prompt_len is None else prompt_len
    ctx = consts.avg_input_len + consts.avg_output_len / 2 if context is None else context
    out = []
    for phase, x, s in points:
        if x <= 0:
            continue
        kw: dict[str, Any] = {"prompt_tokens": int(x)} if phase == "prompt" else {"decode_seqs": int(x)}
        pred = layer_time(shape, gpu, prompt_len=plen, context=ctx, efficiency=efficiency, **kw)
        out.append(math.log(pred / s))
    return out


def fit_efficiency(
    shape: LayerShape, gpu: GpuType, consts: DatasetConstants, points: Sequence[tuple[str, float, float]],
    *, lo: float = 0.02, hi: float = 1.5, prompt_len: int | None = None, context: float | None = None,
) -> float:
    """The efficiency in [lo, hi] that minimises the summed squared log error over ``points``
    (one measured profile's prompt and decode tables, measured with requests of ``prompt_len``
    tokens and ``context`` tokens cached: :func:`log_errors`): a log-spaced scan of 400 values,
    then a golden-section refinement around the best. Deterministic; bounded work."""

    def cost(e: float) -> float:
        return sum(v * v for v in log_errors(shape, gpu, consts, points, efficiency=e, prompt_len=prompt_len,
                                             context=context))

    n = 400
    scan = [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
    costs = [cost(e) for e in scan]
    i = min(range(n), key=costs.__getitem__)
    a, b = scan[max(0, i - 1)], scan[min(n - 1, i + 1)]
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = cost(c), cost(d)
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = cost(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = cost(d)
    return (a + b) / 2
