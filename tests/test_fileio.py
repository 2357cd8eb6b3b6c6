"""helix_async.fileio: output files never written through a symbolic link, TOML keys checked before
the parser sees them (docs/security.md, "Files and flags")."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest
import tomli_w
from hypothesis import given, settings
from hypothesis import strategies as st

from helix_async import fileio
from helix_async.errors import ConfigError
from helix_async.fileio import (
    MAX_TOML_KEY_PARTS,
    atomic_write_bytes,
    atomic_write_text,
    check_toml_keys,
    load_toml,
    open_output_log,
)

# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    return victim


def test_a_symlink_at_the_destination_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    link = tmp_path / "out.json"
    link.symlink_to(victim)
    with pytest.raises(ConfigError, match="symbolic link") as err:
        atomic_write_text(link, "{}\n", "result file")
    assert str(link) in str(err.value)
    assert victim.read_text() == "precious\n"
    assert link.is_symlink()


def test_a_symlink_planted_after_the_check_is_replaced_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race: the destination is checked, then someone puts a link there before the rename.
    victim = _victim(tmp_path)
    link = tmp_path / "url"
    real_check = fileio.check_output_path

    def check_then_plant(path: str | os.PathLike[str], what: str = "file", flag: str = "--out") -> Path:
        p = real_check(path, what, flag)
        link.symlink_to(victim)
        return p

    monkeypatch.setattr(fileio, "check_output_path", check_then_plant)
    atomic_write_text(link, "http://127.0.0.1:1\n", "URL file")
    assert not link.is_symlink()
    assert link.read_text() == "http://127.0.0.1:1\n"
    assert victim.read_text() == "precious\n"


def test_a_symlink_planted_at_the_temporary_name_is_not_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = _victim(tmp_path)
    monkeypatch.setattr(fileio.secrets, "token_hex", lambda n: "fixed")
    (tmp_path / ".out.txt.fixed.tmp").symlink_to(victim)
    with pytest.raises(ConfigError, match="cannot write"):
        atomic_write_text(tmp_path / "out.txt", "new\n")
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "out.txt").exists()


def test_secret_mode_is_set_before_the_file_has_a_name(tmp_path: Path) -> None:
    p = atomic_write_bytes(tmp_path / "worker-0.key_secret", b"secret\n", "secret key", mode=0o600)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert p.read_bytes() == b"secret\n"
    # a rewrite keeps an existing file's bits unless told otherwise
    os.chmod(p, 0o640)
    atomic_write_bytes(p, b"again\n", "secret key")
    assert stat.S_IMODE(p.stat().st_mode) == 0o640


def test_a_log_is_never_opened_through_a_symlink(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    link = tmp_path / "worker0.log"
    link.symlink_to(victim)
    with pytest.raises(ConfigError, match="symbolic link") as err:
        open_output_log(link, "worker log")
    assert str(link) in str(err.value)
    assert victim.read_text() == "precious\n"
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="worker log") as err:
        open_output_log(fifo, "worker log")  # refused at once, not blocked waiting for a reader
    assert str(fifo) in str(err.value)
    good = tmp_path / "serve.log"
    good.write_text("old run\n")
    with open_output_log(good) as fh:
        fh.write(b"new run\n")
    assert good.read_text() == "new run\n"


def test_keys_generate_writes_secrets_600_and_never_through_a_link(tmp_path: Path) -> None:
    pytest.importorskip("zmq")
    from helix_async.transport.curve import generate_keys, load_keys

    written = generate_keys(tmp_path / "keys", 1)
    secrets_ = [p for p in written if p.name.endswith(".key_secret")]
    assert [p.name for p in secrets_] == ["host.key_secret", "worker-0.key_secret"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in secrets_)
    assert sorted(p.name for p in (tmp_path / "keys" / "allowed").iterdir()) == ["host.key", "worker-0.key"]
    assert not list((tmp_path / "keys").glob(".keys-*"))  # the private working folder is gone
    keys = load_keys(tmp_path / "keys", "worker-0")
    assert keys.public and keys.secret and keys.public != keys.secret
    # a link planted where a public key goes is refused, its target untouched
    victim = _victim(tmp_path)
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "host.key").symlink_to(victim)
    with pytest.raises(ConfigError, match="symbolic link"):
        generate_keys(tmp_path / "more", 0)
    assert victim.read_text() == "precious\n"


# ---------------------------------------------------------------------------------------------
# TOML
# ---------------------------------------------------------------------------------------------


def test_the_100_kb_deeply_dotted_file_is_refused_naming_file_and_limit(tmp_path: Path) -> None:
    # The case: one key of 50,000 parts (100 KB) took the standard parser 77 s.
    path = tmp_path / "plan.toml"
    path.write_text("a" + ".a" * 50_000 + " = 1\n")
    assert path.stat().st_size > 100_000
    with pytest.raises(ConfigError) as err:
        load_toml(path, "plan file")
    msg = str(err.value)
    assert str(path) in msg
    assert f"limit of {MAX_TOML_KEY_PARTS}" in msg
    assert msg == f"{path}: line 1: a key of more than 32 dotted parts, over the limit of {MAX_TOML_KEY_PARTS}"
    assert "\n" not in msg


@pytest.mark.parametrize(
    "text, line",
    [
        ("x = 1\n[" + ".".join(["t"] * 33) + "]\n", 2),  # a header
        ("[[" + ".".join(["t"] * 33) + "]]\n", 1),  # an array of tables
        ("[" + ".".join(["t"] * 20) + "]\n" + ".".join(["k"] * 13) + " = 1\n", 2),  # header + key (20 + 13)
        ('"q"' + ' . "q"' * 32 + " = 1\n", 1),  # quoted parts, blanks around the dots
        ("x = {" + ".".join(["k"] * 33) + " = 1}\n", 1),  # inside an inline table
        ("x = [{a = 1}, {" + ".".join(["k"] * 33) + " = 1}]\n", 1),  # in an array of inline tables
        ('s = """\n\n"""\nx = {}\n' + ".".join(["k"] * 33) + " = 1\n", 5),  # after a multi-line string
    ],
)
def test_deep_keys_are_refused_with_their_line(text: str, line: int) -> None:
    with pytest.raises(ConfigError, match=f"deep.toml: line {line}: .* over the limit of 32"):
        check_toml_keys(text, "deep.toml")


@pytest.mark.parametrize(
    "text",
    [
        "[" + ".".join(["t"] * 20) + "]\n" + ".".join(["k"] * 12) + " = 1\n",  # 32 in all: the limit
        'url = "' + ".".join(["a"] * 40) + '"\n',  # dots inside a string value
        "doc = '''\n" + ".".join(["a"] * 40) + " = 1\n'''\n",  # a key-like line in a multi-line string
        "# " + ".".join(["a"] * 40) + " = 1\nx = 1.5\n",  # in a comment
        "xs = [\n" + "".join(f"  {i}.5,\n" for i in range(40)) + "]\n",  # many floats in an array
        "[" + ".".join(["t"] * 15) + "]\n[" + ".".join(["u"] * 15) + "]\nv.w = 1\n",  # a later header resets
    ],
)
def test_valid_files_within_the_limit_are_parsed_as_the_standard_parser_does(text: str) -> None:
    check_toml_keys(text, "ok.toml")
    assert fileio.parse_document(text, "ok.toml", "toml") == tomllib.loads(text)


_KEYS = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6)
_TREES = st.recursive(
    st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=20), st.booleans()),
    lambda kids: st.dictionaries(_KEYS, kids, max_size=4) | st.lists(st.integers(), max_size=3),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_KEYS, _TREES, max_size=5))
def test_anything_tomli_w_writes_is_accepted(doc: dict[str, object]) -> None:
    text = tomli_w.dumps(doc)
    check_toml_keys(text, "gen.toml")
    assert fileio.parse_document(text, "gen.toml", "toml") == tomllib.loads(text)


def test_every_reader_goes_through_the_check(tmp_path: Path) -> None:
    from helix_async.cluster import load_cluster
    from helix_async.placement.io import read_placement

    deep = "[meta]\n" + ".".join(["a"] * 40) + " = 1\n"
    for name, read in (("cluster.toml", load_cluster), ("plan.toml", read_placement)):
        path = tmp_path / name
        path.write_text(deep)
        with pytest.raises(ConfigError, match=f"{path}: line 2: .*limit of 32"):
            read(str(path))


def test_no_toml_is_parsed_outside_fileio() -> None:
    # every TOML read goes through fileio.load_toml / parse_document (its key check first)
    root = Path(fileio.__file__).parent
    sim_root = root.parent / "sim"
    offenders = [
        str(p)
        for p in [*root.rglob("*.py"), *sim_root.rglob("*.py")]
        if p.name != "fileio.py" and ("tomllib.load" in p.read_text() or "tomli.load" in p.read_text())
    ]
    assert offenders == []


def test_no_file_is_written_outside_fileio() -> None:
    # every output goes through fileio's writers (atomic, never through a link); a descriptor from
    # os.open with O_NOFOLLOW (os.fdopen) is the one other way
    import re

    root = Path(fileio.__file__).parent
    writes = re.compile(r"\.write_text\(|\.write_bytes\(|(?<!os\.fd)open\([^)]*[\"'][wax]b?[\"']|\.save\(|savefig\((?!buf)")
    offenders = [
        f"{p}:{no}"
        for p in [*root.rglob("*.py"), *(root.parent / "sim").rglob("*.py")]
        if p.name != "fileio.py"
        for no, line in enumerate(p.read_text().splitlines(), 1)
        if writes.search(line)
    ]
    assert offenders == []
