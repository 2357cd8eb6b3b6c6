"""What each role imports: the runtime side loads no solver, no plotting, no LP library and no torch
(only the torch executor does), and a
missing extra is a one-line error naming the extra to install."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("pyscipopt", "cvxpy", "matplotlib", "torch")

# What a worker or the host imports to serve: wire messages and codec, routing, the clocks, the
# plan reader and the flow value, and max flow for re-planning flows when a node is lost.
RUNTIME_MODULES = (
    "helix_async.ids",
    "helix_async.messages",
    "helix_async.codec",
    "helix_async.routing",
    "helix_async.clock",
    "helix_async.vloop",
    "helix_async.flowplan",
    "helix_async.placement.io",
    "helix_async.placement.flow",
    "helix_async.host",
    "helix_async.worker",
    "helix_async.executors",
)


def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )


def test_runtime_side_imports_no_solver_plots_or_lp() -> None:
    proc = _run(
        f"""
        import importlib, json, sys
        for name in {RUNTIME_MODULES!r}:
            importlib.import_module(name)
        from helix_async.placement.io import load_shipped_layout, placement_to_dict
        from helix_async.placement.flow import max_flow
        p = load_shipped_layout("ilp")
        placement_to_dict(p, max_flow(p))  # read a plan and compute its flows, as a host would
        print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_planning_does_import_the_solver() -> None:
    # the check above is only meaningful if the same probe sees a solver when one is loaded
    pytest.importorskip("pyscipopt")
    proc = _run(
        f"""
        import json, sys
        from helix_async.placement.milp import _scip
        _scip()
        print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["pyscipopt"]


# Block a module for the child process the way an uninstalled one behaves: import raises ImportError.
_BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == {name!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""


@pytest.mark.parametrize(
    ("blocked", "argv", "extra"),
    [
        ("pyscipopt", ["plan", "--cluster", "single24", "--method", "milp", "--time-limit", "5"], "plan"),
        ("matplotlib", ["plan", "--cluster", "single24", "--method", "petals", "--plot", "{tmp}/p.png"], "plots"),
    ],
    ids=["plan-without-scip", "plot-without-matplotlib"],
)
def test_missing_extra_is_one_line_naming_it(tmp_path, blocked: str, argv: list[str], extra: str) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--quiet", "--out", str(tmp_path / "plan.toml")]
    proc = _run(
        _BLOCK.format(name=blocked)
        + f"""
from helix_async.cli import main
sys.exit(main({argv!r}))
"""
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert f"helix_async[{extra}]" in lines[0] and blocked in lines[0]
