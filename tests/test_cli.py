"""The command line: useful output on good input, one clear line and exit 2 on bad input."""

from __future__ import annotations

from pathlib import Path

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
        "error: python -m helix_async plan: argument --time-limit: must be > 0, got '-1' "
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
