"""The command line: useful output on good input, one clear line and exit 2 on bad input."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from helix_async.cli import main
from helix_async.cluster import load_cluster

GOOD_HEADER = """
[meta]
name = "tiny"

[[nodes]]
id = 0
type = "A100"

[[nodes]]
id = 1
type = "A100"
"""


def _links(*rows: str) -> str:
    return "".join(f"\n[[links]]\n{r}\n" for r in rows)


BASE_LINKS = (
    'a = "source"\nb = 0\nbidirectional = false\nbandwidth = 1e9\nlatency = 0.001',
    'a = 0\nb = 1\nbidirectional = true\nbandwidth = 1e9\nlatency = 0.001',
    'a = 1\nb = "sink"\nbidirectional = false\nbandwidth = 1e9\nlatency = 0.001',
)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cluster_show_builtin(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "cluster", "show", "single24")
    assert rc == 0, err
    assert "24 nodes" in out
    assert "A100   x4" in out
    assert "max compute throughput: 2803.86 tokens/s" in out


def test_cluster_show_ini_with_machine_profile(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib import resources

    d = resources.files("helix_async") / "data" / "clusters"
    rc, out, err = _run(
        capsys, "cluster", "show", str(d / "cluster42.ini"), "--machine-profile", str(d / "machine_profile.ini")
    )
    assert rc == 0, err
    assert "max compute throughput: 7104.26 tokens/s" in out


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (GOOD_HEADER.replace('type = "A100"', 'type = "H900"', 1) + _links(*BASE_LINKS), "nodes[0].type"),
        (GOOD_HEADER + _links(*BASE_LINKS, 'a = 0\nb = 7\nbidirectional = true\nbandwidth = 1e9\nlatency = 0.001'), "links[3]"),
        (GOOD_HEADER + _links(BASE_LINKS[0], BASE_LINKS[1].replace("1e9", "-5"), BASE_LINKS[2]), "links[1].bandwidth"),
        (GOOD_HEADER.replace("id = 1", "id = 0") + _links(*BASE_LINKS), "nodes[1].id"),
    ],
    ids=["unknown-gpu-type", "link-to-unknown-node", "negative-bandwidth", "duplicate-id"],
)
def test_bad_cluster_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, needle: str
) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(body)
    rc, out, err = _run(capsys, "cluster", "show", str(f))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "bad.toml" in lines[0] and needle in lines[0]
    assert "Traceback" not in err


def test_model_that_cannot_fit_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "small.toml"
    f.write_text(GOOD_HEADER + _links(*BASE_LINKS))
    rc, out, err = _run(capsys, "cluster", "show", str(f), "--model", "llama2-70b")
    assert rc == 2
    assert "small.toml" in err and "needs 80 layers" in err and "24" in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_model_and_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "cluster", "show", "single24", "--model", "gpt-9")
    assert rc == 2 and "'gpt-9'" in err and "neither a known model" in err and "--model" in err
    rc, _, err = _run(capsys, "cluster", "show", "nowhere42")
    assert rc == 2 and "single24" in err


def test_cluster_generate_roundtrip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "gen.toml"
    rc, out, err = _run(
        capsys, "cluster", "generate", "partitioned", "--partition", "A100:2", "--partition", "L4:2,T4:3",
        "--seed", "3", "--out", str(out_file),
    )
    assert rc == 0, err
    spec = load_cluster(out_file)
    assert spec.num_nodes == 7 and len(spec.regions()) == 2
    rc, out, err = _run(capsys, "cluster", "generate", "single", "--nodes", "6", "--types", "A100:1,T4:1",
                        "--seed", "1", "--out", str(tmp_path / "s.toml"))
    assert rc == 0, err
    again = tmp_path / "s2.toml"
    rc, _, _ = _run(capsys, "cluster", "generate", "single", "--nodes", "6", "--types", "A100:1,T4:1",
                    "--seed", "1", "--out", str(again))
    assert (tmp_path / "s.toml").read_text() == again.read_text()


def test_help_returns_0_and_usage_errors_return_2(capsys: pytest.CaptureFixture[str]) -> None:
    """main() returns the status in every case (argparse's SystemExit does not escape it)."""
    rc, out, err = _run(capsys, "--help")
    assert rc == 0 and out.startswith("usage: python -m helix_async") and err == ""
    rc, out, err = _run(capsys, "plan", "--help")
    assert rc == 0 and "--time-limit" in out
    rc, out, err = _run(capsys, "plan", "--time-limit", "-1")
    assert rc == 2 and out == ""
    assert err == (
        "error: python -m helix_async plan: argument --time-limit: must be > 0 s, got '-1' "
        "(see python -m helix_async plan --help)\n"
    )


def test_bad_log_level_environment_variable_is_one_line(monkeypatch, capsys) -> None:
    from helix_async import cli, envs

    monkeypatch.setattr(envs, "HELIX_LOG_LEVEL", "loud")
    assert cli.main(["cluster", "show", "single24"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: HELIX_LOG_LEVEL: unknown level 'loud'")
    # the flag wins over the variable
    assert cli.main(["--log-level", "info", "cluster", "show", "single24"]) == 0


# ---------------------------------------------------------------------------------------------
# Every numeric flag is bounded by what its consumer takes (docs/security.md, "Files and flags")
# ---------------------------------------------------------------------------------------------


def _numeric_flags() -> list[tuple[str, str, Any]]:
    """(command, flag, type) of every flag of both command lines whose type turns "1" into a number."""
    import argparse

    from helix_async.cli import build_parser
    from sim.cli import build_parser as build_sim_parser

    found: list[tuple[str, str, Any]] = []

    def walk(parser: argparse.ArgumentParser, prog: str) -> None:
        for action in parser._actions:
            if isinstance(action.choices, dict):  # sub-commands
                for name, child in action.choices.items():
                    walk(child, f"{prog} {name}")
            elif callable(action.type) and action.option_strings:
                try:
                    value = action.type("1")
                except (argparse.ArgumentTypeError, ValueError):
                    continue  # not a number type (a pair, a path, a model...)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    found.append((prog, action.option_strings[-1], action.type))

    walk(build_parser(), "helix_async")
    walk(build_sim_parser(), "sim")
    return found


def test_every_numeric_flag_refuses_huge_and_overlong_values() -> None:
    import argparse

    flags = _numeric_flags()
    assert len(flags) > 60  # every command's flags were found, not a few
    unbounded = []
    for prog, flag, convert in flags:
        for text in ("9" * 5000, "1e400", "1e300", str(2**64)):
            try:
                convert(text)
            except argparse.ArgumentTypeError:
                continue
            except Exception as exc:  # noqa: BLE001 - what the test looks for: anything but a usage error
                unbounded.append(f"{prog} {flag} {text[:8]}: {type(exc).__name__}")
            else:
                unbounded.append(f"{prog} {flag} {text[:8]}: accepted")
    assert unbounded == []


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["plan", "--cluster", "tiny3", "--model", "tiny-llama", "--time-limit", "1e22"], ["--time-limit", "<= 1e+09 s"]),
        (["plan", "--seed", str(2**64)], ["--seed", "<= 18446744073709551615"]),
        (["host", "--plan", "p.toml", "--recovery-timeout", "1e12"], ["--recovery-timeout", "<= 1e+09 s"]),
        (["worker", "--connect", "tcp://127.0.0.1:1", "--node-id", "9" * 5000], ["--node-id", "5000 characters"]),
        (["serve", "--http", "127.0.0.1:" + "9" * 5000], ["--http", "HOST:PORT"]),
        (["bench-serve", "--rate", "1e9"], ["--rate", "<= 1000 requests/s"]),
        (["plan", "--slo", "ttft=1e308,tpot=0.1"], ["--slo", "ttft must be <= 86400 seconds"]),
        (["host", "--plan", "p.toml", "--kv", "1e300,1e300"], ["--kv", "HWM must lie in (0, 1]"]),
        (["host", "--plan", "p.toml", "--kv", "0.9,1e300"], ["--kv", "RATIO must lie in [0, 10]"]),
        (["keys", "generate", "k", "--workers", "1e3"], ["--workers", "expected"]),
        (["host", "--plan", "p.toml", "--listen", "tcp://127.0.0.1:99999"], ["--listen", "PORT <= 65535"]),
        (["worker", "--connect", "tcp://127.0.0.1:" + "9" * 5000], ["--connect", "5016 characters"]),
        (["worker", "--connect", "tcp://127.0.0.1:1", "--bind", "tcp://127.0.0.1"], ["--bind", "tcp://HOST:PORT"]),
    ],
)
def test_out_of_range_flags_are_one_line_exit_2(argv: list[str], needles: list[str], capsys) -> None:
    rc, out, err = _run(capsys, *argv)
    assert rc == 2, err
    assert err.startswith("error:") and err.count("\n") == 1
    for needle in needles:
        assert needle in err


def test_sim_duration_and_events_are_bounded(capsys) -> None:
    from sim.cli import main as sim_main
    from sim.runner import MAX_SIM_SECONDS

    assert MAX_SIM_SECONDS == 86_400.0
    assert sim_main(["run", "--plan", "ilp", "--duration", "1e15"]) == 2
    err = capsys.readouterr().err
    assert "--duration" in err and "<= 86400 simulated s" in err and err.count("\n") == 1
    assert sim_main(["run", "--help"]) == 0
    assert "at most 86400" in " ".join(capsys.readouterr().out.split())
    # the work bound: a run that passes --max-events stops with one line, no report
    assert sim_main(["run", "--plan", "ilp", "--duration", "60", "--warmup", "0", "--max-events", "1000"]) == 2
    err = capsys.readouterr().err
    assert "--max-events" in err and "passed 1000 events" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("node=" + "7" * 5000 + "@t=10s", "node ids go up to 2147483647"),
        ("node=1@t=" + "9" * 400 + "s", "times go up to 86400 s"),
        ("node=1@t=10s+" + "9" * 30 + "s", "times go up to 86400 s"),
    ],
)
def test_fault_specs_with_huge_numbers_are_one_line(spec: str, needle: str) -> None:
    from helix_async.errors import ConfigError
    from sim.faults import parse_faults

    with pytest.raises(ConfigError, match=needle) as err:
        parse_faults(spec)
    assert len(str(err.value)) < 300


def test_an_online_trace_too_large_to_hold_is_refused() -> None:
    from helix_async.errors import ConfigError
    from helix_async.workloads import MAX_GENERATED_QUERIES, generate_online_trace

    with pytest.raises(ConfigError, match=f"--rate: .* over the limit of {re.escape(f'{MAX_GENERATED_QUERIES:g}')}"):
        generate_online_trace(token_rate=1e15, duration=86_400)


def test_output_files_behind_a_symlink_are_refused_at_the_command_line(tmp_path: Path, capsys) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "link"
    link.symlink_to(victim)
    for argv in (
        ["bench-serve", "--json", str(link)],
        ["host", "--plan", "p.toml", "--address-file", str(link)],
        ["host", "--plan", "p.toml", "--url-file", str(link)],
        ["serve", "--url-file", str(link)],
    ):
        rc, out, err = _run(capsys, *argv)
        assert rc == 2, argv
        assert "symbolic link" in err and err.count("\n") == 1, err
    assert victim.read_text() == "precious\n"
