"""The executors' table (``helix_async.executors.registry``): the ``worker``, ``launch`` and ``serve``
commands take their choices and flags from it, a worker builds its executor from it, a new
executor is one entry (here, one defined in this file), and a model that does not load reaches the
host as what went wrong: ``OUT_OF_MEMORY`` only when memory ran out, ``LOAD_FAILED`` otherwise."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helix_async.errors import ConfigError
from helix_async.executors.cost_model import CostModelExecutor
from helix_async.executors.null import NullExecutor
from helix_async.executors.registry import (
    EXECUTORS,
    ExecutorContext,
    ExecutorEntry,
    ExecutorLoadError,
    Flag,
    executor_entry,
    executor_flags,
    register,
)
from helix_async.ids import SINK, NodeRef
from helix_async.messages import AssignLayers, Error, ErrorCode, Register
from helix_async.model import get_model
from helix_async.runtime import commands, launch, serve
from helix_async.runtime.worker_main import WorkerExit, WorkerServer
from helix_async.settings import WorkerOptions

# --------------------------------------------------------------------------------------------------
# A new executor, as a plugin module would write it: a factory and one entry with its own flag
# --------------------------------------------------------------------------------------------------


class FakeExecutor(NullExecutor):
    """A null executor that remembers what it was built from."""

    def __init__(self, ctx: ExecutorContext) -> None:
        super().__init__(ctx.clock)
        self.ctx = ctx


def fake(ctx: ExecutorContext) -> FakeExecutor:
    return FakeExecutor(ctx)


def broken_checkpoint(ctx: ExecutorContext) -> Any:
    raise ExecutorLoadError(f"{ctx.options['checkpoint']}: tensor 'model.norm.weight' is missing")


def too_big(ctx: ExecutorContext) -> Any:
    a, b = ctx.layers
    raise ExecutorLoadError(f"layers [{a}, {b}) need 9000 bytes; the device holds 10", out_of_memory=True)


FAKE = ExecutorEntry("fake", "a test executor", f"{__name__}:fake",
                     (Flag("--fake-speed", "fake_speed", "how fast it pretends to be", kind="positive", default=2.0),),
                     devices=("cpu",))


@pytest.fixture
def registered() -> Iterator[list[str]]:
    """Entries a test registers; removed again afterwards."""
    names: list[str] = []
    yield names
    for n in names:
        EXECUTORS.pop(n, None)


def add(names: list[str], entry: ExecutorEntry) -> None:
    register(entry)
    names.append(entry.name)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="helix_async")
    sub = p.add_subparsers()
    commands.add_parsers(sub, int, float, lambda s: tuple(float(x) for x in s.split(",")))
    serve.add_parser(sub, int, float)
    launch.add_parser(sub, float)
    return p


def choices(p: argparse.ArgumentParser, command: str, dest: str) -> list[str] | None:
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices[command]._actions if a.dest == dest)
    return None if action.choices is None else list(action.choices)


# --------------------------------------------------------------------------------------------------
# The table and the commands
# --------------------------------------------------------------------------------------------------


def test_the_table_holds_the_three_executors_and_their_capabilities() -> None:
    assert list(EXECUTORS) == ["torch", "cost-model", "null"]
    torch, cost, null = EXECUTORS["torch"], EXECUTORS["cost-model"], EXECUTORS["null"]
    assert torch.extra == ("torch", "torch") and torch.blocking and "cuda" in torch.devices
    assert torch.weight_formats and torch.reads("--checkpoint") and not torch.needs_profile
    assert cost.needs_profile and cost.emulates and cost.reads("--time-scale") and cost.devices == ()
    assert null.flags == () and not (null.needs_profile or null.emulates or null.blocking) and null.extra is None
    # one definition per flag, however many executors read it
    opts = [f.option for f in executor_flags()]
    assert len(opts) == len(set(opts)) and {"--checkpoint", "--dtype", "--time-scale", "--plan"} <= set(opts)
    assert "needs --machine-type" in cost.describe() and "no device" in null.describe()


def test_commands_take_choices_and_flags_from_the_table() -> None:
    p = parser()
    assert choices(p, "launch", "executor") == list(EXECUTORS)
    # serve's local workers have no machine type to emulate
    assert choices(p, "serve", "executor") == [n for n, e in EXECUTORS.items() if not e.needs_profile] == ["torch", "null"]
    a = p.parse_args(["worker", "--connect", "tcp://127.0.0.1:1", "--executor", "cost-model", "--machine-type", "A100",
                      "--time-scale", "4", "--dtype", "float16"])
    opts = commands.worker_options(a)
    assert (opts.executor, opts.machine_type, opts.time_scale, opts.dtype, opts.extra) == ("cost-model", "A100", 4.0,
                                                                                           "float16", ())
    # defaults are WorkerOptions' own
    d = commands.worker_options(p.parse_args(["worker", "--connect", "tcp://127.0.0.1:1"]))
    assert d == WorkerOptions(connect="tcp://127.0.0.1:1")


def test_unknown_executor_and_missing_machine_type_name_their_flag() -> None:
    with pytest.raises(ConfigError, match=r"--executor: unknown executor 'vllm-next'; known: torch, cost-model, null"):
        WorkerServer(WorkerOptions(connect="tcp://127.0.0.1:1", executor="vllm-next"))
    with pytest.raises(ConfigError, match="--machine-type: the cost-model executor needs the machine type it emulates"):
        WorkerOptions(connect="tcp://127.0.0.1:1", executor="cost-model").check()
    with pytest.raises(ConfigError, match="--executor: unknown executor 'x'"):
        executor_entry("x")


def test_register_refuses_a_taken_name_or_a_flag_declared_differently(registered: list[str]) -> None:
    with pytest.raises(ValueError, match="'null' is registered already"):
        register(ExecutorEntry("null", "again", f"{__name__}:fake"))
    clash = ExecutorEntry("clash", "x", f"{__name__}:fake", (Flag("--dtype", "dtype", "other", choices=("int8",)),))
    with pytest.raises(ValueError, match="'clash' declares --dtype unlike another executor"):
        register(clash)
    assert "clash" not in EXECUTORS
    with pytest.raises(ValueError, match="expected --NAME"):
        Flag("dtype", "dtype", "h")


# --------------------------------------------------------------------------------------------------
# A worker process builds its executor from the table
# --------------------------------------------------------------------------------------------------


class FakeTransport:
    """Stands in for the worker process's ZeroMQ transport: records what it sends."""

    address = "tcp://127.0.0.1:5999"
    curve = None
    closed = True  # the stats reporter stops at once

    def __init__(self) -> None:
        self.sent: list[tuple[NodeRef, Any]] = []
        self.connected: list[tuple[NodeRef, str]] = []

    def send(self, dest: NodeRef, msg: Any) -> None:
        self.sent.append((dest, msg))

    def connect(self, node: NodeRef, address: str) -> None:
        self.connected.append((node, address))

    def rename(self, node: NodeRef, name: str) -> None:
        pass


def serve_layers(opts: WorkerOptions, start: int = 0, end: int = 8) -> tuple[WorkerServer, FakeTransport, BaseException | None]:
    """Run ``opts``'s worker through an assignment of tiny-llama's layers [start, end) with a fake
    transport; returns the server, what it sent and what it raised."""
    server = WorkerServer(opts)
    real, fake_tp = server.tp, FakeTransport()
    server.tp = fake_tp  # type: ignore[assignment]
    assign = AssignLayers(node_id=0, model="tiny-llama", start=start, end=end, plan_id=1, next_hops=())

    async def main() -> BaseException | None:
        try:
            await server._start_serving(assign)
        except WorkerExit as e:
            return e
        finally:
            for t in server._tasks:
                t.cancel()
            await asyncio.gather(*server._tasks, return_exceptions=True)
            await real.close()
        return None

    return server, fake_tp, asyncio.run(main())


def test_a_new_executor_is_one_entry_flags_included(registered: list[str]) -> None:
    add(registered, FAKE)
    p = parser()
    a = p.parse_args(["worker", "--connect", "tcp://127.0.0.1:1", "--node-id", "0", "--executor", "fake",
                      "--fake-speed", "3", "--insecure"])
    opts = commands.worker_options(a)
    assert opts.extra == (("fake_speed", 3.0),) and opts.values()["fake_speed"] == 3.0
    assert commands.worker_options(p.parse_args(["worker", "--connect", "tcp://x:1"])).extra == (("fake_speed", 2.0),)
    assert choices(p, "launch", "executor") == ["torch", "cost-model", "null", "fake"]
    server, tp, raised = serve_layers(opts)
    assert raised is None
    ex = server.executor
    assert isinstance(ex, FakeExecutor)
    assert ex.ctx.layers == (0, 8) and ex.ctx.model == get_model("tiny-llama") and ex.ctx.profile is None
    assert ex.ctx.options["fake_speed"] == 3.0 and ex.ctx.clock is server.clock
    w = server.worker
    assert w is not None and w.settings.layers == (0, 8) and w.settings.out_links == (SINK,)
    ready = [m for _, m in tp.sent if isinstance(m, Register)]
    assert ready and "ready" in ready[-1].capabilities and ready[-1].capabilities[0] == "fake"


def test_the_cost_model_is_built_with_its_profile_and_time_scale() -> None:
    opts = WorkerOptions(connect="tcp://127.0.0.1:1", node_id=0, executor="cost-model", machine_type="CPU", time_scale=2.0, insecure=True)
    server, _tp, raised = serve_layers(opts, 2, 5)
    assert raised is None and isinstance(server.executor, CostModelExecutor)
    assert server.worker is not None and server.worker.settings.layers == (2, 5) and server.worker.settings.out_links == ()


# --------------------------------------------------------------------------------------------------
# Load failures: what the host is told
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "code", "what", "why"),
    [
        ("broken_checkpoint", ErrorCode.LOAD_FAILED, "model load failed", "/ckpt: tensor 'model.norm.weight' is missing"),
        ("too_big", ErrorCode.OUT_OF_MEMORY, "out of memory", "layers [0, 8) need 9000 bytes; the device holds 10"),
    ],
)
def test_a_load_failure_reaches_the_host_as_what_it_is(registered: list[str], factory: str, code: ErrorCode, what: str,
                                                         why: str) -> None:
    add(registered, ExecutorEntry("failing", "fails to load", f"{__name__}:{factory}", blocking=True))
    _server, tp, raised = serve_layers(WorkerOptions(connect="tcp://127.0.0.1:1", executor="failing", checkpoint="/ckpt", insecure=True))
    assert isinstance(raised, WorkerExit) and str(raised) == why
    errors = [m for d, m in tp.sent if isinstance(m, Error)]
    assert [(m.request_id, m.code, m.text) for m in errors] == [(-1, int(code), f"node 0: {what}: {why}")]
    assert all(d == SINK for d, m in tp.sent if isinstance(m, Error))


def test_torch_tells_a_bad_checkpoint_from_a_device_too_small(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    spec = get_model("tiny-llama")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.num_key_value_heads,
    }))
    # a checkpoint without weights: not a memory problem
    _s, tp, raised = serve_layers(WorkerOptions(connect="tcp://127.0.0.1:1", checkpoint=str(ckpt), insecure=True), 0, 3)
    assert isinstance(raised, WorkerExit) and "no *.safetensors file" in str(raised)
    (err,) = [m for _, m in tp.sent if isinstance(m, Error)]
    assert err.code == ErrorCode.LOAD_FAILED and err.text.startswith("node 0: model load failed: ")
    # dummy weights that do not fit the device: memory
    _s, tp, raised = serve_layers(WorkerOptions(connect="tcp://127.0.0.1:1", memory_bytes=1000, insecure=True), 0, 3)
    assert isinstance(raised, WorkerExit) and "the device holds 1000" in str(raised)
    (err,) = [m for _, m in tp.sent if isinstance(m, Error)]
    assert err.code == ErrorCode.OUT_OF_MEMORY and err.text.startswith("node 0: out of memory: layers [0, 3) need ")
