"""Bad input through the real command line (issue 7, "Input hardening").

Every row of the tables below is one bad input (the files it needs and the argv that reads them)
and the fragments its error must contain. Each runs ``helix_async.cli.main`` in-process and must
give exit code 2 and exactly one line on stderr, starting with ``error: ``, naming the file and the
field (or the flag), printable (control characters from the input are escaped), without a
traceback, and without echoing thousands of characters of hostile input. Every row also checks
that the test folder is unchanged afterwards: nothing replaced, no temporary file left. An alarm
fails a row that blocks (instead of hanging the suite). A real subprocess is used only where a
process matters: reading a FIFO, and SIGTERM arriving during a write.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helix_async.cli import main
from helix_async.cluster import import_helix_ini, load_cluster, read_machine_profile_ini
from helix_async.errors import ConfigError
from helix_async.fileio import atomic_write_text
from helix_async.placement.io import read_placement

# --------------------------------------------------------------------------------------------------
# Inputs: a small valid cluster in each format, a valid machine profile, a valid plan (made once)
# --------------------------------------------------------------------------------------------------

CLUSTER_TOML = """\
[meta]
name = "tiny"

[machine_types.A100]
num_gpus = 1

[[nodes]]
id = 0
type = "A100"
region = "east"

[[nodes]]
id = 1
type = "A100"

[[links]]
a = "source"
b = 0
bandwidth = 1e9
latency = 0.001

[[links]]
a = 0
b = 1
bandwidth = 1e9
latency = 0.001

[[links]]
a = 1
b = "sink"
bandwidth = 1e9
latency = 0.001
"""

CLUSTER_INI = (
    "[NodeNames]\ntotal_compute_nodes=2\n\n"
    "[SourceNode]\nconnected_nodes=[0, 1]\n\n[SinkNode]\nconnected_nodes=[0, 1]\n\n"
    "[ComputeNode-0]\ntype=A100\nconnected_nodes=['source', 1, 'sink']\n\n"
    "[ComputeNode-1]\ntype=T4\nconnected_nodes=['source', 0, 'sink']\n\n"
    "[Link-source-0]\nbandwidth=1000 * mbps\nlatency=1 * MilliSec\n\n"
    "[Link-source-1]\nbandwidth=1000 * mbps\nlatency=1 * MilliSec\n\n"
    "[Link-0-sink]\nbandwidth=1000 * mbps\nlatency=1 * MilliSec\n\n"
    "[Link-1-sink]\nbandwidth=1000 * mbps\nlatency=1 * MilliSec\n\n"
    "[Link-0-1]\nbandwidth=1000 * mbps\nlatency=2 * MilliSec\n"
)

PROFILE_INI = """\
[SourceNode]
outbound_nic_speed = 10 * gbps

[SinkNode]
inbound_nic_speed = 10 * gbps

[A100]
inbound_nic_speed = 10 * gbps
outbound_nic_speed = 10 * gbps
disk_speed = 1 * gbps
vram_size = 80 * GB

[T4]
inbound_nic_speed = 10 * gbps
outbound_nic_speed = 10 * gbps
disk_speed = 1 * gbps
vram_size = 16 * GB
"""

# The fast heuristic used wherever a command has to plan something.
PETALS = ("plan", "--method", "petals", "--cluster", "single24", "--quiet")


def _sub(text: str, old: str, new: str) -> str:
    """``text`` with the first ``old`` replaced; the base must contain it (a typo fails loudly)."""
    assert old in text, old
    return text.replace(old, new, 1)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


HUGE_INT = "9" * 5000  # past Python's 4300-digit int-conversion limit
BIG_INT = "9" * 4000  # parses as an int, too large for a float
DEEP = _nested(100_000)


@pytest.fixture(scope="module")
def plan_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A valid plan file (petals on single24), as TOML text."""
    out = tmp_path_factory.mktemp("plan") / "plan.toml"
    assert main([*PETALS, "--out", str(out)]) == 0
    return out.read_text()


def test_bases_are_valid(tmp_path: Path, plan_text: str) -> None:
    """The inputs the rows mutate are good, so each row fails for its own mutation alone."""
    (tmp_path / "c.toml").write_text(CLUSTER_TOML)
    (tmp_path / "c.ini").write_text(CLUSTER_INI)
    (tmp_path / "p.ini").write_text(PROFILE_INI)
    (tmp_path / "plan.toml").write_text(plan_text)
    assert load_cluster(tmp_path / "c.toml").nodes[0].region == "east"
    assert import_helix_ini(tmp_path / "c.ini", tmp_path / "p.ini").num_nodes == 2
    assert read_machine_profile_ini(tmp_path / "p.ini")["A100"].vram_bytes == 80e9
    assert read_placement(tmp_path / "plan.toml").method == "petals"


@pytest.mark.parametrize("number", [HUGE_INT, "\u0661", "\u00b9"], ids=["5000-digits", "arabic-indic", "superscript"])
def test_region_header_comments_are_best_effort(number: str, tmp_path: Path) -> None:
    """A generator-header comment naming a partition oddly is ignored, never a traceback."""
    path = tmp_path / "c.toml"
    path.write_text(f"# partition-{number}: ['A100', 'A100']\n" + _sub(CLUSTER_TOML, 'region = "east"\n', ""))
    assert {node.region for node in load_cluster(path).nodes} == {"default"}
    path.write_text("# partition-0: ['A100', 'A100']\n" + _sub(CLUSTER_TOML, 'region = "east"\n', ""))
    assert {node.region for node in load_cluster(path).nodes} == {"region0"}  # the well-formed header works


# --------------------------------------------------------------------------------------------------
# The check every row shares
# --------------------------------------------------------------------------------------------------


class _Hung(BaseException):
    """Raised by the alarm: not an OSError or HelixError, so the CLI cannot turn it into exit 2."""


@pytest.fixture()
def no_hang() -> Iterator[None]:
    """Fail (instead of blocking forever) if a command is still running after 20 s."""

    def ring(signum: int, frame: object) -> None:
        raise _Hung("the command blocked (FIFO or device read?)")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)  # main returns; argparse errors must not escape as SystemExit either
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, needles: list[str], folder: Path | None = None) -> str:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    line = lines[0]
    assert line.startswith("error: "), line
    assert line.isprintable(), f"raw control characters on stderr: {line!r}"
    # readable: a 4,000-digit number or a 5,000-character name in the input is cut, not echoed
    shown = line.replace(str(folder), "T") if folder is not None else line
    assert len(shown) <= 500, f"{len(shown)} characters: {line[:400]}"
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


@dataclass(frozen=True)
class PlanEdit:
    """File content: the valid plan file's text with its first ``old`` replaced by ``new``."""

    old: str
    new: str


@dataclass(frozen=True)
class Bad:
    """One bad input: ``files`` (name -> content) are written to the test folder, then ``argv`` runs.

    ``{tmp}`` in ``argv`` and ``needles`` stands for the folder.
    """

    argv: tuple[str, ...]
    needles: tuple[str, ...]
    files: dict[str, str | bytes | PlanEdit] = field(default_factory=dict)


def _cluster_toml(old: str, new: str, *needles: str) -> Bad:
    return Bad(("cluster", "show", "{tmp}/c.toml"), ("{tmp}/c.toml", *needles), {"c.toml": _sub(CLUSTER_TOML, old, new)})


def _cluster_ini(old: str, new: str, *needles: str) -> Bad:
    return Bad(("cluster", "show", "{tmp}/c.ini"), ("{tmp}/c.ini", *needles), {"c.ini": _sub(CLUSTER_INI, old, new)})


def _profile(old: str, new: str, *needles: str) -> Bad:
    return Bad(
        ("cluster", "show", "{tmp}/c.ini", "--machine-profile", "{tmp}/p.ini"),
        ("{tmp}/p.ini", *needles),
        {"c.ini": CLUSTER_INI, "p.ini": _sub(PROFILE_INI, old, new)},
    )


def _flow(name: str, content: str | bytes | PlanEdit, *needles: str) -> Bad:
    return Bad(("flow", f"{{tmp}}/{name}"), (f"{{tmp}}/{name}", *needles), {name: content})


ESC = "\\u001b[31m"  # a TOML escape: the parsed string holds a raw ESC character

FILE_CASES: dict[str, Bad] = {
    # plan files given to `flow`: not text, not UTF-8, hostile numbers and nesting
    "plan-binary": _flow("plan.toml", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a UTF-8 text file"),
    "plan-latin1": _flow("plan.toml", "[plan]\nmethod = 'caf\xe9'\n".encode("latin-1"), "not a UTF-8 text file"),
    "plan-utf16": _flow("plan.json", '{"plan": {}}'.encode("utf-16"), "not a UTF-8 text file"),
    "plan-empty": _flow("plan.toml", "", "plan"),
    "plan-toml-huge-int": _flow("plan.toml", f"[plan]\nnum_layers = {HUGE_INT}\n", "invalid TOML"),
    "plan-json-huge-int": _flow("plan.json", f'{{"plan": {{"num_layers": {HUGE_INT}}}}}', "invalid JSON"),
    "plan-toml-deep": _flow("plan.toml", f"[plan]\nx = {DEEP}\n", "invalid TOML", "nested too deeply"),
    "plan-json-deep": _flow("plan.json", f'{{"plan": {DEEP}}}', "invalid JSON", "nested too deeply"),
    "plan-json-deep-objects": _flow("plan.json", '{"a":' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
    "plan-top-array": _flow("plan.json", "[1, 2]", "top level must be a table"),
    "plan-big-num-layers": _flow("plan.toml", PlanEdit("num_layers = 80", f"num_layers = {BIG_INT}"), "plan.num_layers"),
    "plan-cluster-latency": _flow("plan.toml", PlanEdit("latency = 0.001", "latency = 1e308"), "cluster.links[0].latency", "implausible"),
    "plan-cluster-region-esc": _flow(
        "plan.toml", PlanEdit('type = "A100" }', f'type = "A100", region = "{ESC}" }}'), "cluster.nodes[", ".region", "\\x1b"
    ),
    "plan-method-esc": _flow("plan.toml", PlanEdit('method = "petals"', f'method = "{ESC}"'), "plan.method", "\\x1b"),
    "plan-flow-big-value": _flow("plan.toml", PlanEdit("[flow]\nvalue = 952", f"[flow]\nvalue = {BIG_INT}"), "flow", "value"),
    "plan-flow-big-capacity": _flow(
        "plan.toml", PlanEdit("[flow.node_capacity]\n0 = ", f"[flow.node_capacity]\n0 = {BIG_INT}\n99 = "), "flow", "node_capacity"
    ),
    "plan-flow-arabic-node": _flow(
        "plan.toml", PlanEdit("[flow.node_flows]\n0 = ", '[flow.node_flows]\n"\u0661" = 1.0\n"x0" = '), "flow", "node id"
    ),
    "plan-flow-string-value": _flow("plan.toml", PlanEdit("[flow]\nvalue = 952.1073984850639", '[flow]\nvalue = "nan"'), "flow", "value"),
    "plan-flow-negative": _flow("plan.toml", PlanEdit("[flow.node_flows]\n0 = ", "[flow.node_flows]\n0 = -1.0\nx0 = "), "flow", ">= 0"),
    "plan-node-huge-id": _flow("plan.toml", PlanEdit("[[nodes]]\nid = 0", f"[[nodes]]\nid = {BIG_INT}"), "nodes[0].id"),
    "plan-valid-with-deep-value": _flow("plan.toml", PlanEdit("[plan]", f"[plan]\nx = {DEEP}"), "invalid TOML", "nested too deeply"),
    # TOML cluster files: hostile numbers and nesting
    "cluster-toml-huge-int": _cluster_toml("bandwidth = 1e9", f"bandwidth = {HUGE_INT}", "invalid TOML"),
    "cluster-toml-big-int": _cluster_toml("bandwidth = 1e9", f"bandwidth = {BIG_INT}", "links[0].bandwidth", "out of range"),
    "cluster-toml-deep": _cluster_toml('name = "tiny"', f'name = "tiny"\nx = {DEEP}', "invalid TOML", "nested too deeply"),
    "cluster-toml-deep-inline": _cluster_toml('name = "tiny"', "x = " + "{a = " * 100_000 + "1" + "}" * 100_000, "invalid TOML"),
    "cluster-toml-binary": Bad(("cluster", "show", "{tmp}/c.toml"), ("{tmp}/c.toml", "UTF-8"), {"c.toml": b"\xff\xfe\x00["}),
    # TOML cluster files: physically absurd values and names with control characters
    "cluster-latency-1e308": _cluster_toml("latency = 0.001", "latency = 1e308", "links[0].latency", "<= 3600 s"),
    "cluster-vram-1e300": _cluster_toml("num_gpus = 1", "num_gpus = 1\nvram_bytes = 1e300", "machine_types.A100.vram_bytes"),
    "cluster-bandwidth-1e300": _cluster_toml("bandwidth = 1e9", "bandwidth = 1e300", "links[0].bandwidth", "implausible"),
    "cluster-nic-1e300": _cluster_toml("num_gpus = 1", "num_gpus = 1\nnic_in = 1e300", "machine_types.A100.nic_in"),
    "cluster-coordinator-1e300": _cluster_toml("[[nodes]]", "[coordinator]\nnic_out = 1e300\n\n[[nodes]]", "coordinator.nic_out"),
    "cluster-num-gpus-1e9": _cluster_toml("num_gpus = 1", f"num_gpus = {10**9}", "machine_types.A100.num_gpus"),
    "cluster-region-esc": _cluster_toml('region = "east"', f'region = "{ESC}east"', "nodes[0].region", "\\x1b"),
    "cluster-name-esc": _cluster_toml('name = "tiny"', f'name = "tiny{ESC}"', "meta.name", "\\x1b"),
    "cluster-name-newline": _cluster_toml('name = "tiny"', 'name = "tiny\\nerror: forged"', "meta.name"),
    "cluster-type-name-esc": _cluster_toml(
        "[machine_types.A100]\nnum_gpus = 1",
        f'[machine_types."T{ESC}"]\nnum_gpus = 1\nvram_bytes = 1e10\nnic_in = 1e9\nnic_out = 1e9\ndisk = 1e9',
        "machine_types", "\\x1b",
    ),
    "cluster-gpu-esc": _cluster_toml("num_gpus = 1", f'num_gpus = 1\ngpu = "a{ESC}"', "machine_types.A100.gpu"),
    "cluster-long-name": _cluster_toml('name = "tiny"', f'name = "{"x" * 5000}"', "meta.name", "longer than"),
    # Helix INI clusters: section names with non-ASCII digits are never node ids
    "ini-link-superscript": _cluster_ini("[Link-0-1]", "[Link-0-\u00b9]", "[Link-0-\u00b9]", "unknown endpoint"),
    "ini-link-arabic-indic": _cluster_ini("[Link-0-1]", "[Link-0-\u0661]", "[Link-0-\u0661]", "unknown endpoint"),
    "ini-link-fullwidth": _cluster_ini("[Link-0-1]", "[Link-\uff10-1]", "unknown endpoint"),
    "ini-node-arabic-indic": _cluster_ini("[ComputeNode-1]", "[ComputeNode-\u0661]", "[ComputeNode-1]", "missing"),
    "ini-node-huge-id": _cluster_ini("[Link-0-1]", f"[ComputeNode-{HUGE_INT}]\ntype=T4\n\n[Link-0-1]", "[ComputeNode-", "outside"),
    "ini-link-huge-id": _cluster_ini("[Link-0-1]", f"[Link-0-{HUGE_INT}]", "[Link-0-"),
    "ini-nodes-huge": _cluster_ini("total_compute_nodes=2", f"total_compute_nodes={HUGE_INT}", "[NodeNames].total_compute_nodes"),
    "ini-latency-1e308": _cluster_ini("latency=2 * MilliSec", "latency=1e308 * Sec", "[Link-0-1].latency", "implausible"),
    "ini-bandwidth-1e300": _cluster_ini("bandwidth=1000 * mbps\nlatency=2", "bandwidth=1e300 * mbps\nlatency=2", "[Link-0-1].bandwidth"),
    "ini-bandwidth-overflow": _cluster_ini("bandwidth=1000 * mbps\nlatency=2", "bandwidth=1e308 * 1e308\nlatency=2", "[Link-0-1].bandwidth"),
    "ini-binary": Bad(("cluster", "show", "{tmp}/c.ini"), ("{tmp}/c.ini", "UTF-8"), {"c.ini": b"[NodeNames]\n\xff\n"}),
    # Helix machine profiles
    "profile-vram-1e300": _profile("vram_size = 80 * GB", "vram_size = 1e300 * GB", "[A100].vram_size", "out of range"),
    "profile-vram-1e20": _profile("vram_size = 80 * GB", "vram_size = 1e20 * GB", "[A100].vram_size", "implausible"),
    "profile-num-gpus-1e9": _profile("vram_size = 80 * GB", f"vram_size = 80 * GB\nnum_gpus = {10**9}", "machine_types.A100.num_gpus"),
    "profile-section-esc": _profile("[T4]", "[T4\x1b[31m]", "\\x1b"),
    "profile-section-huge-suffix": _profile("[T4]", f"[T4x{HUGE_INT}]", "[T4x"),
    "profile-binary": Bad(
        ("cluster", "show", "{tmp}/c.ini", "--machine-profile", "{tmp}/p.ini"),
        ("{tmp}/p.ini", "UTF-8"),
        {"c.ini": CLUSTER_INI, "p.ini": b"\x00\xff"},
    ),
    # files that are not regular files: devices, folders, missing
    "flow-dev-zero": Bad(("flow", "/dev/zero"), ("/dev/zero", "not a regular file")),
    "flow-folder": Bad(("flow", "{tmp}"), ("{tmp}", "folder")),
    "flow-missing": Bad(("flow", "{tmp}/none.toml"), ("{tmp}/none.toml", "no such file")),
    "flow-name-with-controls": Bad(("flow", "{tmp}/a\nerror: b\x1b[31m.toml"), ("{tmp}/a\\nerror: b\\x1b[31m.toml", "no such file")),
    "cluster-name-too-long": Bad(("cluster", "show", "{tmp}/" + "a" * 5000), ("{tmp}/aaaa", "characters) ...", "File name too long")),
    "flow-name-with-nul": Bad(("flow", "{tmp}/a\x00.toml"), ("\\x00", "not a valid file name")),
    "profile-dev-zero": Bad(("cluster", "show", "{tmp}/c.ini", "--machine-profile", "/dev/zero"), ("/dev/zero", "not a regular file"), {"c.ini": CLUSTER_INI}),
    "cluster-dev-zero": Bad(("cluster", "show", "/dev/zero"), ("/dev/zero", "not a regular file")),
    "plan-cluster-dev-zero": Bad((*PETALS, "--cluster", "/dev/zero", "--out", "{tmp}/p.toml"), ("/dev/zero", "not a regular file")),
}

FLAG_CASES: dict[str, Bad] = {
    # limits of the MILP search
    "time-limit-nan": Bad((*PETALS, "--time-limit", "nan"), ("--time-limit", "finite")),
    "time-limit-inf": Bad((*PETALS, "--time-limit", "inf"), ("--time-limit", "finite")),
    "time-limit-negative": Bad((*PETALS, "--time-limit", "-1"), ("--time-limit", "> 0")),
    "time-limit-zero": Bad((*PETALS, "--time-limit", "0"), ("--time-limit", "> 0")),
    "time-limit-text": Bad((*PETALS, "--time-limit", "soon"), ("--time-limit", "number")),
    "stall-limit-inf": Bad((*PETALS, "--stall-limit", "inf"), ("--stall-limit", "finite")),
    "gap-limit-nan": Bad((*PETALS, "--gap-limit", "nan"), ("--gap-limit", "finite")),
    "gap-limit-negative": Bad((*PETALS, "--gap-limit", "-0.1"), ("--gap-limit", ">= 0")),
    "prune-negative": Bad((*PETALS, "--prune", "-1"), ("--prune", ">= 1")),
    "prune-zero": Bad((*PETALS, "--prune", "0"), ("--prune", ">= 1")),
    "node-limit-zero": Bad((*PETALS, "--node-limit", "0"), ("--node-limit", ">= 1")),
    "round-limit-negative": Bad((*PETALS, "--round-limit", "-1"), ("--round-limit", ">= 0")),
    "round-limit-fraction": Bad((*PETALS, "--round-limit", "1.5"), ("--round-limit", "integer")),
    "log-level-bogus": Bad(("--log-level", "bogus", *PETALS), ("--log-level", "bogus")),
    "method-bogus": Bad(("plan", "--method", "bogus"), ("--method", "bogus")),
    "no-command": Bad((), ("command",)),
    # pictures
    "flow-plot-txt": Bad(("flow", "{tmp}/plan.toml", "--plot", "{tmp}/x.txt"), ("--plot", "x.txt")),
    "plan-plot-txt": Bad((*PETALS, "--plot", "{tmp}/x.txt"), ("--plot", "x.txt")),
    "plan-plot-folder": Bad((*PETALS, "--out", "{tmp}/p.toml", "--plot", "{tmp}/pic.png"), ("{tmp}/pic.png", "folder"), {"pic.png/keep": "x"}),
    # cluster generate
    "partition-no-count": Bad(("cluster", "generate", "partitioned", "--partition", "A100", "--out", "{tmp}/g.toml"), ("--partition", "A100")),
    "partition-nan": Bad(("cluster", "generate", "partitioned", "--partition", "A100:nan", "--out", "{tmp}/g.toml"), ("--partition", "finite")),
    "partition-inf": Bad(("cluster", "generate", "partitioned", "--partition", "A100:inf", "--out", "{tmp}/g.toml"), ("--partition", "finite")),
    "partition-1e9": Bad(("cluster", "generate", "partitioned", "--partition", "A100:1e9", "--out", "{tmp}/g.toml"), ("--partition", "nodes in all")),
    "partition-fraction": Bad(("cluster", "generate", "partitioned", "--partition", "A100:2.5", "--out", "{tmp}/g.toml"), ("--partition", "whole number")),
    "partition-negative": Bad(("cluster", "generate", "partitioned", "--partition", "A100:-1", "--out", "{tmp}/g.toml"), ("--partition", ">= 0")),
    "partition-unknown-type": Bad(("cluster", "generate", "partitioned", "--partition", "H900:2", "--out", "{tmp}/g.toml"), ("H900",)),
    "partition-empty": Bad(("cluster", "generate", "partitioned", "--partition", "A100:0", "--out", "{tmp}/g.toml"), ("--partition",)),
    "partition-missing": Bad(("cluster", "generate", "partitioned", "--out", "{tmp}/g.toml"), ("--partition",)),
    "nodes-1000000": Bad(("cluster", "generate", "single", "--nodes", "1000000", "--out", "{tmp}/g.toml"), ("--nodes", "what a cluster file holds")),
    "nodes-zero": Bad(("cluster", "generate", "single", "--nodes", "0", "--out", "{tmp}/g.toml"), ("--nodes", ">= 1")),
    "degree-negative": Bad(("cluster", "generate", "single", "--nodes", "4", "--degree", "-1", "--out", "{tmp}/g.toml"), ("--degree",)),
    "degree-too-big": Bad(("cluster", "generate", "single", "--nodes", "4", "--degree", "9", "--out", "{tmp}/g.toml"), ("--degree",)),
    "types-all-zero": Bad(("cluster", "generate", "single", "--nodes", "4", "--types", "A100:0", "--out", "{tmp}/g.toml"), ("--types",)),
    "types-nan": Bad(("cluster", "generate", "single", "--types", "A100:nan", "--out", "{tmp}/g.toml"), ("--types", "finite")),
    "gen-bandwidth-1e300": Bad(("cluster", "generate", "single", "--nodes", "4", "--bandwidth", "1e300", "--out", "{tmp}/g.toml"), ("--bandwidth", "implausible")),
    "gen-latency-1e308": Bad(("cluster", "generate", "single", "--nodes", "4", "--latency", "1e308", "--out", "{tmp}/g.toml"), ("--latency", "implausible")),
    "gen-cross-latency-nan": Bad(("cluster", "generate", "partitioned", "--partition", "A100:2", "--cross-latency", "nan", "--out", "{tmp}/g.toml"), ("--cross-latency", "finite")),
    "gen-in-bandwidth-var": Bad(("cluster", "generate", "partitioned", "--partition", "A100:2", "--in-bandwidth", "1e9,2e9", "--out", "{tmp}/g.toml"), ("--in-bandwidth", "avg - var")),
    "gen-name-esc": Bad(("cluster", "generate", "single", "--nodes", "4", "--name", "x\x1b[31m", "--out", "{tmp}/g.toml"), ("--name", "\\x1b")),
    "demo-out-empty": Bad(("demo", "--quick", "--out", ""), ("--out", "empty path")),
    # the operator's endpoints
    "admin-key-no-http": Bad(("host", "--plan", "{tmp}/plan.toml", "--insecure", "--admin-key", "k"),
                             ("--admin-key", "needs --http")),
    "admin-key-is-api-key": Bad(("host", "--plan", "{tmp}/plan.toml", "--insecure", "--http", "127.0.0.1:0",
                                 "--api-key", "k", "--admin-key", "k"), ("--admin-key", "a key of its own")),
    "gen-out-missing-folder": Bad(("cluster", "generate", "single", "--nodes", "4", "--out", "{tmp}/no/g.toml"), ("{tmp}/no/g.toml", "does not exist")),
}


def _materialise(case: Bad, tmp_path: Path, plan_text: str) -> list[str]:
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, PlanEdit):
            path.write_text(_sub(plan_text, content.old, content.new), encoding="utf-8")
        else:
            path.write_text(content, encoding="utf-8")
    return [a.replace("{tmp}", str(tmp_path)) for a in case.argv]


@pytest.mark.usefixtures("no_hang")
@pytest.mark.parametrize("case", [pytest.param(c, id=k) for k, c in {**FILE_CASES, **FLAG_CASES}.items()])
def test_bad_input_is_one_line(case: Bad, tmp_path: Path, plan_text: str, capsys: pytest.CaptureFixture[str]) -> None:
    if "plan.toml" not in case.files:
        (tmp_path / "plan.toml").write_text(plan_text)  # a valid plan, for rows whose flags are bad
    argv = _materialise(case, tmp_path, plan_text)
    before = _snapshot(tmp_path)
    rc, out, err = _run(capsys, argv)
    line = assert_one_line_error(rc, err, [n.replace("{tmp}", str(tmp_path)) for n in case.needles], tmp_path)
    if "characters) ..." not in case.needles:  # the readers shorten values; the CLI's cut is a last resort
        assert "characters) ..." not in line, line
    assert _snapshot(tmp_path) == before  # a refused command writes nothing, not even a temp file


# --------------------------------------------------------------------------------------------------
# Writing: --out onto things that are not a new path or a writable regular file
# --------------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, tuple[str, bytes | str]]:
    """Every entry under ``folder``: kind and content (link target for links)."""
    out: dict[str, tuple[str, bytes | str]] = {}
    for path in sorted(folder.rglob("*")):
        st = os.lstat(path)
        key = str(path.relative_to(folder))
        if stat.S_ISLNK(st.st_mode):
            out[key] = ("link", os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            out[key] = (f"file {stat.S_IMODE(st.st_mode):o}", path.read_bytes())
        else:
            out[key] = (stat.filemode(st.st_mode)[0], b"")
    return out


def _make_target(kind: str, tmp_path: Path) -> str:
    """The ``--out`` value for one kind of target (made under ``tmp_path`` where it is a path there)."""
    if kind == "folder":
        (tmp_path / "out.toml").mkdir()
        (tmp_path / "out.toml" / "keep.txt").write_text("keep")
        return str(tmp_path / "out.toml")
    if kind == "symlink":
        (tmp_path / "real.toml").write_text("original\n")
        (tmp_path / "out.toml").symlink_to("real.toml")
        return str(tmp_path / "out.toml")
    if kind == "dangling-symlink":
        (tmp_path / "out.toml").symlink_to("nowhere.toml")
        return str(tmp_path / "out.toml")
    if kind == "read-only":
        (tmp_path / "out.toml").write_text("original\n")
        (tmp_path / "out.toml").chmod(0o444)
        return str(tmp_path / "out.toml")
    if kind == "fifo":
        os.mkfifo(tmp_path / "out.toml")
        return str(tmp_path / "out.toml")
    if kind == "dev-null":
        return "/dev/null"
    if kind == "empty":
        return ""
    if kind == "missing-folder":
        return str(tmp_path / "no" / "out.toml")
    raise AssertionError(kind)


OUT_KINDS = {
    # kind -> fragment of the message besides the flag or file
    "folder": "folder",
    "symlink": "symbolic link",
    "dangling-symlink": "symbolic link",
    "read-only": "read-only",
    "fifo": "not a regular file",
    "dev-null": "not a regular file",
    "empty": "empty path",
    "missing-folder": "does not exist",
}

WRITERS = {
    "plan": [*PETALS, "--out"],
    "cluster-generate": ["cluster", "generate", "single", "--nodes", "4", "--out"],
}


@pytest.mark.usefixtures("no_hang")
@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("kind", list(OUT_KINDS))
def test_out_refuses_what_is_not_a_file(kind: str, writer: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = _make_target(kind, tmp_path)
    before = _snapshot(tmp_path)
    dev_before = os.stat("/dev/null") if kind == "dev-null" else None
    rc, out, err = _run(capsys, [*WRITERS[writer], target])
    needles = [OUT_KINDS[kind], target if target else "--out"]
    assert_one_line_error(rc, err, needles)
    assert _snapshot(tmp_path) == before  # nothing replaced, no temp file, no DIR.tmp
    assert not list(tmp_path.parent.glob(f"{tmp_path.name}*.tmp"))
    if dev_before is not None:
        st = os.stat("/dev/null")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == dev_before.st_rdev
        assert not list(Path("/dev").glob(".null.*"))


def test_out_replaces_a_writable_file_atomically(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The accepted case: an existing regular file is replaced (mode kept), no temp file remains."""
    target = tmp_path / "out.toml"
    target.write_text("old\n")
    target.chmod(0o640)
    rc, out, err = _run(capsys, [*PETALS, "--out", str(target)])
    assert rc == 0, err
    assert read_placement(target).method == "petals"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.toml"]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "ctrl-c"])
@pytest.mark.parametrize("where", ["open", "replace"])
def test_atomic_write_leaves_no_temp_file_on_failure(
    failure: BaseException, where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception right after the temp file is created, or at the rename, removes the temp file."""
    target = tmp_path / "out.toml"
    target.write_text("old\n")
    real = getattr(os, where)

    def fail(*args: object, **kwargs: object) -> object:
        if where == "open":
            real(*args, **kwargs)  # the file now exists: fail as a signal landing here would
        raise failure

    monkeypatch.setattr(os, where, fail)
    with pytest.raises(ConfigError if isinstance(failure, OSError) else KeyboardInterrupt) as exc:
        atomic_write_text(target, "new\n", "plan file")
    if isinstance(failure, OSError):
        assert str(exc.value) == f"{target}: cannot write plan file: No space left on device"
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.toml"]


def test_atomic_write_refuses_text_it_cannot_encode(tmp_path: Path) -> None:
    target = tmp_path / "out.toml"
    with pytest.raises(ConfigError, match=r"out\.toml: cannot write plan file: surrogates not allowed"):
        atomic_write_text(target, "name = '\ud800'\n", "plan file")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_a_write_waits_for_the_rename(tmp_path: Path) -> None:
    """SIGTERM's default action ends a process without cleanup; during a write it is held until
    the rename is done, so the target is complete and no temp file remains (a real process)."""
    target = tmp_path / "out.toml"
    target.write_text("old\n")
    script = (
        "import os, signal, sys\n"
        "from helix_async.fileio import atomic_write_text\n"
        "real = os.open\n"
        "def open_then_term(*a, **k):\n"
        "    fd = real(*a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return fd\n"
        "os.open = open_then_term\n"
        "atomic_write_text(sys.argv[1], 'new\\n', 'plan file')\n"
        "print('not reached: SIGTERM arrives once the write is done')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stdout, proc.stderr)
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.toml"]


# --------------------------------------------------------------------------------------------------
# FIFOs: readers must not block on them (a real process, killed if it hangs)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fifo"),
    [
        (["flow", "{fifo}"], "plan.toml"),
        (["cluster", "show", "{tmp}/c.ini", "--machine-profile", "{fifo}"], "p.ini"),
        (["cluster", "show", "{fifo}"], "c.toml"),
    ],
    ids=["flow", "machine-profile", "cluster"],
)
def test_fifo_input_is_refused_without_blocking(args: list[str], fifo: str, tmp_path: Path) -> None:
    (tmp_path / "c.ini").write_text(CLUSTER_INI)
    path = tmp_path / "fifo" / fifo
    path.parent.mkdir()
    os.mkfifo(path)
    argv = [a.replace("{fifo}", str(path)).replace("{tmp}", str(tmp_path)) for a in args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "helix_async", *argv], capture_output=True, text=True, timeout=60, env=env
        )
    except subprocess.TimeoutExpired:  # pragma: no cover - the failure this test exists for
        pytest.fail(f"{argv} blocked on a FIFO")
    assert_one_line_error(proc.returncode, proc.stderr, [str(path), "not a regular file"])


# --------------------------------------------------------------------------------------------------
# Flags that do not apply are named, not silently ignored
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--time-limit", "5"], "--time-limit"),
        (["--time-limit", "5", "--gap-limit", "0.1", "--prune", "3"], "--gap-limit, --prune, --time-limit"),
        (["--partial"], "--partial"),
    ],
    ids=["time-limit", "three-flags", "partial"],
)
def test_heuristic_notes_ignored_flags(
    extra: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "p.toml"
    rc, out, err = _run(capsys, [*PETALS, *extra, "--out", str(out_file)])
    assert rc == 0, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: ") and named in lines[0] and "petals" in lines[0], err
    assert "ignored" in lines[0]
    assert read_placement(out_file).method == "petals"


def test_heuristic_without_milp_flags_prints_no_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, [*PETALS, "--seed", "3", "--out", str(tmp_path / "p.toml")])
    assert rc == 0 and err == ""


def test_seed_for_an_unseeded_heuristic_is_noted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "p.toml"
    rc, out, err = _run(capsys, ["plan", "--cluster", "single24", "--method", "separate", "--seed", "3",
                                 "--quiet", "--out", str(out_file)])
    assert rc == 0, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: --seed") and "separate" in lines[0], err


def test_plan_progress_bar_replaces_the_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pyscipopt")
    out_file = tmp_path / "p.toml"
    rc, out, err = _run(capsys, ["plan", "--objective", "maxflow", "--cluster", "single24", "--time-limit", "3", "--stall-limit", "3",
                                 "--progress", "--out", str(out_file)])
    assert rc == 0, err
    assert "planning:" in err and "gap" in err  # the bar, with the search's figures
    assert "incumbent" not in err  # not the progress lines
    assert read_placement(out_file).method == "milp"
