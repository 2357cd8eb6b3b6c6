"""Seeded paths are deterministic across processes: same seed, same bytes, whatever the hash seed.

Python salts ``hash()`` of str/bytes per process (``PYTHONHASHSEED``), so iterating a set or
ordering by ``hash()`` can change output from one run to the next while every in-process test
passes.  Each seeded path below runs in fresh subprocesses under two hash seeds, through the
command line (``python -m helix_async``) or the public ``helix_async.routing`` names, and the
files written and the stdout must be equal byte for byte.  The only thing masked is the wall time
that ``plan`` prints ("... in 0.1 s"); stderr (progress lines with wall times) is not compared.

Not covered: ``plan --method milp``.  Its search is bounded by wall time only (``--time-limit``,
``--stall-limit`` and SCIP's ``limits/time`` are seconds; there is no node or iteration limit), so
the plan it returns depends on how fast the machine is, not only on the seed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import helix_async

HASH_SEEDS = ("0", "12345")
STEP_TIMEOUT = 120  # seconds per subprocess; each takes well under a second when healthy

# The seeded routing baselines, driven from a plan file written by an earlier step: every policy at
# every sending node routes the same 40 requests hop by hop from the source to the sink, with a
# fixed pattern of busy links, queue lengths and observed delays.  Prints one line per node seed
# and per route.
ROUTING_SNIPPET = """
import sys
import tomllib

from helix_async.routing import RandomPolicy, ShortestQueuePolicy, SwarmPolicy, node_seed

plan_path, run_seed = sys.argv[1], int(sys.argv[2])
with open(plan_path, "rb") as f:
    links = tomllib.load(f)["links"]
out_links = {}
for link in links:
    out_links.setdefault(link["src"], []).append(link["dst"])
for node in out_links:
    print("node_seed", node, node_seed(run_seed, node))


def make(kind, node):
    if kind == "swarm":
        return SwarmPolicy(out_links[node], eps=0.05, alpha=0.8)
    cls = RandomPolicy if kind == "random" else ShortestQueuePolicy
    return cls(out_links[node], seed=node_seed(run_seed, node))


for kind in ("random", "shortest-queue", "swarm"):
    policies = {node: make(kind, node) for node in out_links}
    load = {}

    def queue_len(node):
        return load.get(node, 0) % 5

    for req in range(40):
        node, route = "source", ["source"]
        while node != "sink" and len(route) < 200:
            policy = policies[node]
            free = [(req + len(route) + i) % 4 != 0 for i in range(len(policy.out_links))]
            i = policy.choose(free, queue_len)
            if i < 0:
                i = policy.choose(None, queue_len)
            if i < 0:
                route.append("stuck")
                break
            if kind == "swarm":
                policy.observe(i, ((req * 7 + len(route) * 3 + i) % 11) / 100)
            node = policy.out_links[i]
            load[node] = load.get(node, 0) + 1
            route.append(str(node))
        print(kind, req, "->".join(route))
"""


@dataclass(frozen=True)
class Step:
    """One seeded path: a command line (run in the step's work directory) and the files it writes."""

    name: str
    argv: tuple[str, ...]  # arguments after the interpreter
    outputs: tuple[str, ...] = ()
    # a substring every healthy stdout contains (so empty or truncated output cannot pass)
    expect: str = ""


def _cli(command_line: str) -> tuple[str, ...]:
    """``python -m helix_async`` with these whitespace-separated arguments."""
    return ("-m", "helix_async", *command_line.split())


STEPS = (
    Step(
        "cluster-generate-single",
        _cli("cluster generate single --nodes 16 --types A100:2,L4:6,T4:8 --seed 1 --out single.toml"),
        ("single.toml",),
        "16 nodes",
    ),
    Step(
        "cluster-generate-partitioned",
        _cli(
            "cluster generate partitioned --partition A100:4,L4:4 --partition T4:6,L4:4 --seed 0 --out partitioned.toml"
        ),
        ("partitioned.toml",),
        "2 region(s)",
    ),
    Step(
        "plan-petals",
        _cli("plan --cluster single24 --method petals --seed 3 --out petals.toml"),
        ("petals.toml",),
        "max flow",
    ),
    Step(
        "plan-swarm",
        _cli("plan --cluster single24 --method swarm --seed 3 --out swarm.toml"),
        ("swarm.toml",),
        "max flow",
    ),
    Step(
        "plan-homogeneous",
        _cli("plan --cluster single24 --method homogeneous --seed 3 --out homogeneous.toml"),
        ("homogeneous.toml",),
        "max flow",
    ),
    # Plans of the generated clusters: the cluster reader and the JSON plan writer on seeded input.
    Step(
        "plan-petals-generated-single",
        _cli("plan --cluster single.toml --method petals --seed 2 --out petals_single.json"),
        ("petals_single.json",),
        "max flow",
    ),
    Step(
        "plan-homogeneous-generated-partitioned",
        _cli(
            "plan --cluster partitioned.toml --method homogeneous --seed 1 --out homogeneous_partitioned.toml"
        ),
        ("homogeneous_partitioned.toml",),
        "max flow",
    ),
    Step(
        "routing-baselines",
        ("-c", ROUTING_SNIPPET, "petals.toml", "7"),
        (),
        "swarm 39 source->",
    ),
)

# plan prints its wall time ("planned llama2-70b on single24 with petals in 0.1 s (...)").
_WALL_TIME = re.compile(rb"\bin \d+(?:\.\d+)? s\b")


@dataclass
class Run:
    """What one step did under one hash seed."""

    returncode: int
    stdout: bytes
    stderr: bytes
    files: dict[str, bytes | None] = field(default_factory=dict)  # None: not written


def _env(hash_seed: str) -> dict[str, str]:
    env = dict(os.environ)  # keeps HELIX_NO_EXTENSIONS, so the pure run checks the pure twins
    env["PYTHONHASHSEED"] = hash_seed
    # Import the very helix_async this test imported (source tree or installed).
    root = str(Path(helix_async.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _run(argv: tuple[str, ...], cwd: Path, hash_seed: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, *argv],
        cwd=cwd,
        env=_env(hash_seed),
        capture_output=True,
        timeout=STEP_TIMEOUT,
        check=False,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Run]]:
    """Every step, in order, once per hash seed, each seed in its own work directory."""
    out: dict[str, dict[str, Run]] = {}
    for hash_seed in HASH_SEEDS:
        work = tmp_path_factory.mktemp(f"hashseed{hash_seed}")
        out[hash_seed] = per_step = {}
        for step in STEPS:
            proc = _run(step.argv, work, hash_seed)
            files = {}
            for name in step.outputs:
                path = work / name
                files[name] = path.read_bytes() if path.is_file() else None
            per_step[step.name] = Run(proc.returncode, proc.stdout, proc.stderr, files)
    return out


def _describe(run: Run) -> str:
    return f"exit {run.returncode}; stderr tail: {run.stderr.decode(errors='replace')[-1500:]}"


def _step_params() -> list[object]:
    return [pytest.param(step, id=step.name) for step in STEPS]


@pytest.mark.parametrize("step", _step_params())
def test_seeded_path_is_independent_of_the_hash_seed(runs: dict[str, dict[str, Run]], step: Step) -> None:
    a, b = (runs[h][step.name] for h in HASH_SEEDS)
    for hash_seed, run in zip(HASH_SEEDS, (a, b), strict=True):
        assert run.returncode == 0, f"PYTHONHASHSEED={hash_seed}: {_describe(run)}"
        assert step.expect.encode() in run.stdout, f"PYTHONHASHSEED={hash_seed}: {run.stdout!r}"
        for name, data in run.files.items():
            assert data, f"PYTHONHASHSEED={hash_seed}: {name} was not written (or is empty)"
    for name in step.outputs:
        assert a.files[name] == b.files[name], f"{name} differs between hash seeds {HASH_SEEDS}"
    assert _WALL_TIME.sub(b"in <t> s", a.stdout) == _WALL_TIME.sub(b"in <t> s", b.stdout)


def test_routing_covers_every_policy(runs: dict[str, dict[str, Run]]) -> None:
    # The routing comparison means something only if requests really travel source -> sink.
    lines = runs[HASH_SEEDS[0]]["routing-baselines"].stdout.decode().splitlines()
    routes = [line.split() for line in lines if not line.startswith("node_seed")]
    assert {kind for kind, _, _ in routes} == {"random", "shortest-queue", "swarm"}
    assert len(routes) == 3 * 40
    assert all(route.startswith("source->") and route.endswith("->sink") for _, _, route in routes)
    # The random policies do draw: not every request takes the same route.
    assert len({route for kind, _, route in routes if kind == "random"}) > 1


def test_hash_seed_reaches_the_subprocess(tmp_path: Path) -> None:
    # The harness can fail: output that depends on str hashing differs between the two hash seeds.
    code = "print(hash('helix'), list({'source', 'sink', 'A100', 'L4', 'T4', 'H100', 'petals', 'swarm'}))"
    outs = [_run(("-c", code), tmp_path, h) for h in HASH_SEEDS]
    assert all(p.returncode == 0 for p in outs), [p.stderr for p in outs]
    assert outs[0].stdout != outs[1].stdout
