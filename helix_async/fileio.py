"""Reading and writing the package's files safely, and the field checks every file reader shares.

Readers (cluster files, plan files, INI files) go through :func:`read_text`, which accepts only a
regular file below a size cap and decodes UTF-8, and :func:`parse_document`, which turns TOML or
JSON into a dict and reports nesting too deep or integers too long as one line. The ``*_field``
helpers check one parsed value and raise :class:`~helix_async.errors.ConfigError` naming the file
(``src``) and the field (``where``), so the cluster and plan readers say the same thing the same way.

Writers use :func:`atomic_write_text`: a new path or an existing regular file is replaced
atomically (temporary file in the same folder, then rename); anything else (a folder, a symlink,
a device or FIFO, a read-only file) is refused, and no temporary file is ever left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import reprlib
import secrets
import signal
import stat
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from importlib.abc import Traversable
from pathlib import Path
from typing import IO, Any

from .errors import ConfigError
from .ids import SINK, SOURCE, NodeRef

__all__ = [
    "MAX_FILE_BYTES",
    "PHYSICAL_LIMITS",
    "read_text",
    "parse_document",
    "load_toml",
    "check_toml_keys",
    "MAX_TOML_KEY_PARTS",
    "check_output_path",
    "atomic_write_text",
    "atomic_write_bytes",
    "open_output_log",
    "table_field",
    "array_field",
    "no_unknown_keys",
    "required_field",
    "int_field",
    "str_field",
    "name_field",
    "bool_field",
    "number_field",
    "node_ref_field",
    "short_repr",
]

MAX_FILE_BYTES = 64 * 1024 * 1024  # no file the package reads comes near this; bounds hostile input

# Largest physically meaningful values per unit. A value past these is a typo or hostile input, not
# a machine (1 PB/s links, 1 PB of VRAM, an hour of one-way latency).
PHYSICAL_LIMITS: Mapping[str, float] = {
    "bytes/s": 1e15,
    "bytes": 1e15,
    "s": 3600.0,
}

_MAX_NAME_LEN = 200

# Values shown in messages: hostile input can hold a 4,000-digit integer or a list of a million
# items, and the message must stay one readable line.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlong = 40
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = 10


def short_repr(value: Any) -> str:
    """``repr(value)`` for a message: control characters escaped, long values cut with ``...``."""
    return _SHOWN.repr(value)


def read_text(path: str | os.PathLike[str], what: str = "file", *, max_bytes: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of the regular file ``path``; ConfigError naming the file for anything else.

    A FIFO, a device such as ``/dev/zero``, a folder, a file over ``max_bytes`` or one that is not
    UTF-8 is refused on one line; nothing reads more than ``max_bytes + 1`` bytes.
    """
    p = Path(path)
    src = str(p)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConfigError(src, "", f"cannot read {what}: no such file") from None
    except OSError as exc:
        raise ConfigError(src, "", f"cannot read {what}: {exc.strerror or exc}") from None
    except ValueError:  # a NUL character in the name
        raise ConfigError(repr(src), "", f"cannot read {what}: not a valid file name") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ConfigError(src, "", f"cannot read {what}: {kind}")
    if st.st_size > max_bytes:
        raise ConfigError(src, "", f"{what} is {st.st_size} bytes, over the limit of {max_bytes}")
    try:
        with open(p, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(src, "", f"cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise ConfigError(src, "", f"{what} grew past the limit of {max_bytes} bytes while being read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(src, "", f"not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None


def parse_document(text: str, src: str, fmt: str) -> dict[str, Any]:
    """Parse ``text`` as ``fmt`` ("toml" or "json") into a dict; one-line ConfigError otherwise.

    Deep nesting (RecursionError) and integers too long to convert (ValueError) are reported like
    any syntax error, never as a traceback. TOML is first checked by :func:`check_toml_keys`
    (the standard parser takes time quadratic in a key's dotted depth).
    """
    if fmt != "json":
        check_toml_keys(text, src)  # (outside the try: its ConfigError is a ValueError too)
    try:
        if fmt == "json":
            doc = json.loads(text)
        else:
            doc = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(src, "", f"invalid {fmt.upper()}: {exc}") from None
    except RecursionError:
        raise ConfigError(src, "", f"invalid {fmt.upper()}: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal past the int-conversion digit limit
        # (its message ends in advice to call sys.set_int_max_str_digits, which is for programmers)
        reason = str(exc).splitlines()[0].split("; use sys.set_int_max_str_digits")[0]
        raise ConfigError(src, "", f"invalid {fmt.upper()}: {reason}") from None
    if not isinstance(doc, dict):
        raise ConfigError(src, "", f"the top level must be a table, got {type(doc).__name__}")
    return doc


def load_toml(
    path: str | os.PathLike[str] | Traversable, what: str = "TOML file", *, src: str | None = None,
    max_bytes: int = MAX_FILE_BYTES,
) -> dict[str, Any]:
    """The TOML file ``path`` as a dict; every failure one ConfigError naming the file (``src``,
    by default ``path``).

    Every TOML reader of the package comes here: the file must be a regular UTF-8 file of at most
    ``max_bytes`` (:func:`read_text`; a packaged resource is read up to the same cap), its keys
    are checked by :func:`check_toml_keys` before the parser sees them, and the parser's own
    failures are one line (:func:`parse_document`).
    """
    if isinstance(path, (str, os.PathLike)):
        text = read_text(path, what, max_bytes=max_bytes)
        name = str(Path(path)) if src is None else src
    else:  # a packaged resource that is not a plain path (a zip import)
        name = str(path) if src is None else src
        try:
            with path.open("rb") as fh:
                data = fh.read(max_bytes + 1)
        except OSError as exc:
            raise ConfigError(name, "", f"cannot read {what}: {exc.strerror or exc}") from None
        if len(data) > max_bytes:
            raise ConfigError(name, "", f"{what} is over the limit of {max_bytes} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(name, "", f"not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    return parse_document(text, name, "toml")


#: The most parts a TOML key may have, the enclosing ``[table]`` header's parts included
#: (``[a.b]`` then ``c.d = 1`` is 4). The package's own files use at most 3.
MAX_TOML_KEY_PARTS = 32

# A run of 16 or more dotted key parts anywhere (strings included): a cheap, linear pre-filter.
# Without such a run every key and header has at most 15 parts, 30 together, under the limit, and
# the exact scan below is skipped. Possessive quantifiers and the look-behind (a run starts where a
# part can start) keep it linear on any text.
_DEEP_RUN = re.compile(
    r"(?<![A-Za-z0-9_\\-])(?:(?:[A-Za-z0-9_-]++|\"(?:[^\"\\\n]|\\.)*+\"|'[^'\n]*+')[ \t]*+\.[ \t]*+){15}"
)
# The exact scan's tokens: multi-line strings, one-line strings, comments, newlines, blanks, bare
# words (keys, numbers, dates), and any other single character.
_TOML_TOKEN = re.compile(
    r'''(?P<s>"""(?:[^"\\]|\\.|"(?!""))*+"""|\'\'\'(?:[^']|'(?!''))*+\'\'\'|"(?:[^"\\\n]|\\.)*+"|'[^'\n]*+')'''
    r"|(?P<c>#[^\n]*+)|(?P<n>\n)|(?P<w>[ \t\r]++)|(?P<b>[A-Za-z0-9_+:-]++)|(?P<p>.)",
    re.S,
)


def check_toml_keys(text: str, src: str, *, max_parts: int = MAX_TOML_KEY_PARTS) -> None:
    """ConfigError naming ``src`` and the line if a key of the TOML ``text`` has more than
    ``max_parts`` dotted parts (counting its ``[table]`` header's); time linear in ``len(text)``.

    The standard library's parser takes time quadratic in a key's depth: a 100 KB file holding one
    key of 50,000 parts takes over a minute. Anything that is not valid TOML is left for the parser
    to report; this only counts keys.
    """
    if _DEEP_RUN.search(text) is None:
        return
    match = _TOML_TOKEN.match
    stack: list[str] = []  # open [ and { inside values
    header = 0  # parts of the last [table] header
    line = 1
    at_key = True  # where a key (or a header) may begin
    line_start = True
    pos, end = 0, len(text)
    while pos < end:
        m = match(text, pos)
        assert m is not None  # the last alternative matches any character
        kind, tok = m.lastgroup, m.group()
        if kind == "n":
            line += 1
            if not stack:
                at_key = line_start = True
        elif kind in ("w", "c"):
            pass
        elif at_key and (kind in ("s", "b") or (tok == "[" and line_start and not stack)):
            is_header = kind == "p"
            if is_header:  # skip "[" or "[[" and blanks to the header's first part
                pos = m.end()
                while (m := match(text, pos)) is not None and (m.lastgroup == "w" or m.group() == "["):
                    pos = m.end()
            parts, pos = _dotted_parts(text, pos, max_parts + 1)
            total = parts if is_header or stack else header + parts
            if total > max_parts:
                what = "table header" if is_header else "key"
                count = f"more than {max_parts}" if parts > max_parts else str(parts)
                inside = f" under a table header of {header} parts" if total != parts else ""
                raise ConfigError(
                    src, "", f"line {line}: a {what} of {count} dotted parts{inside}, over the limit of {max_parts}"
                )
            if is_header:
                header = parts
            at_key = line_start = False
            continue
        else:
            line += tok.count("\n") if kind == "s" else 0
            if tok in ("[", "{"):
                stack.append(tok)
                at_key = tok == "{"
            elif tok in ("]", "}"):
                if stack:
                    stack.pop()
            elif tok == "," and stack and stack[-1] == "{":
                at_key = True
            line_start = False
        pos = m.end()


def _dotted_parts(text: str, pos: int, enough: int) -> tuple[int, int]:
    """How many parts the dotted key at ``text[pos:]`` has (counting stops at ``enough``), and
    where the counting stopped."""
    parts = 0
    while parts < enough and (m := _TOML_TOKEN.match(text, pos)) is not None and m.lastgroup in ("s", "b"):
        parts += 1
        pos = m.end()
        after = pos
        if (m := _TOML_TOKEN.match(text, after)) is not None and m.lastgroup == "w":
            after = m.end()
        if text.startswith(".", after):
            after += 1
            if (m := _TOML_TOKEN.match(text, after)) is not None and m.lastgroup == "w":
                after = m.end()
            pos = after
        else:
            break
    return parts, pos


def check_output_path(path: str | os.PathLike[str], what: str = "file", flag: str = "--out") -> Path:
    """``path`` as a place :func:`atomic_write_text` may write; ConfigError saying why not.

    Accepted: a new name in an existing folder, or an existing regular file that is writable. A
    folder, a symbolic link, a device or FIFO, a read-only file (one this user may not write, or one
    with no write permission bit set, which holds for root too) or an empty name is refused.
    Call it before long work so that a bad ``--out`` fails at once, not after the work.
    """
    raw = os.fspath(path)
    if not raw:
        raise ConfigError("<argument>", flag, f"empty path for the {what}")
    p = Path(raw)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ConfigError(raw, "", f"cannot write {what}: {exc.strerror or exc}") from None
    except ValueError:  # a NUL character in the name
        raise ConfigError(repr(raw), "", f"cannot write {what}: not a valid file name") from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise ConfigError(raw, "", f"refusing to replace a symbolic link with the {what}")
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(raw, "", f"is a folder; give a file name for the {what}")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(raw, "", f"refusing to replace something that is not a regular file with the {what}")
        # No write bit at all marks a file read-only for everyone, root included (os.access lets
        # root write anything); otherwise ask whether this user may write it.
        if not st.st_mode & 0o222 or not os.access(p, os.W_OK):
            raise ConfigError(raw, "", f"cannot write {what}: the file is read-only")
    if not p.parent.is_dir():
        raise ConfigError(raw, "", f"cannot write {what}: folder {str(p.parent)!r} does not exist")
    return p


def atomic_write_text(
    path: str | os.PathLike[str], text: str, what: str = "file", *, mode: int | None = None, flag: str = "--out"
) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; ConfigError for a target that is not a file.

    Only what :func:`check_output_path` accepts is written, and a symbolic link at ``path`` is
    never followed: it is refused, and one planted after that check is replaced by the rename,
    its target untouched. The temporary file is created with ``O_EXCL | O_NOFOLLOW`` in the
    target's folder (so the rename is atomic) and is removed on every exit path; signals that
    would interrupt the write are held until it is done (see :func:`_signals_deferred`).
    ``mode``: the file's permission bits (``0o600`` for a secret); by default an existing file's
    bits are kept and a new file gets ``0o666`` less the umask. ``flag`` names the option that
    gave the path, for an empty one.
    """
    p = check_output_path(path, what, flag)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate cannot be written as UTF-8
        raise ConfigError(str(p), "", f"cannot write {what}: {exc.reason} at character {exc.start}") from None
    # Never write what the readers would refuse (a complete graph of 2,048 generated nodes is
    # about 180 MB of TOML): fail here, with the size, instead of at the next read.
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(
            str(p), "", f"the {what} would be {len(data)} bytes, over the readers' limit of {MAX_FILE_BYTES}"
        )
    with _signals_deferred():
        return _write_via_temp(p, data, what, mode)


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, what: str = "file", *, mode: int | None = None, flag: str = "--out"
) -> Path:
    """:func:`atomic_write_text` for bytes (pictures, keys): same checks, same atomic replace."""
    p = check_output_path(path, what, flag)
    with _signals_deferred():
        return _write_via_temp(p, data, what, mode)


# Signals whose handler may raise (KeyboardInterrupt) or whose default action ends the process.
_DEFERRED_SIGNALS = frozenset(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name)
)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP/SIGQUIT while a temp file exists; they arrive right after.

    Otherwise a signal landing between the temp file's creation and its rename or removal
    (SIGTERM's default action ends the process at once, no ``finally`` runs) would leave it
    behind. A write takes milliseconds, so the delay is not felt. The mask is per thread: this
    covers the CLI, which writes from its only thread.
    """
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - not on POSIX
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _write_via_temp(p: Path, data: bytes, what: str, mode: int | None) -> Path:
    raw = str(p)
    try:
        existing = os.lstat(p)
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise ConfigError(raw, "", f"cannot write {what}: {exc.strerror or exc}") from None
    if mode is None:
        if existing is not None and stat.S_ISREG(existing.st_mode):
            mode = stat.S_IMODE(existing.st_mode)
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
    tmp: str | None = None
    try:
        # Named before it is created (not mkstemp), so that an exception at any point after the
        # creation finds the name in ``tmp`` and the ``finally`` removes the file. O_EXCL (with
        # O_NOFOLLOW, for systems where O_EXCL alone would follow) never opens anything that was
        # already there, a symbolic link planted under the temporary name included; the mode is
        # set on the open descriptor, never by name.
        tmp = str(p.parent / f".{p.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
        # rename(2) replaces the directory entry: if a symbolic link was put at ``p`` after
        # check_output_path looked, the link itself is replaced, its target is never written.
        os.replace(tmp, p)
        tmp = None
    except OSError as exc:
        raise ConfigError(raw, "", f"cannot write {what}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return p


_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def open_output_log(path: str | os.PathLike[str], what: str = "log") -> IO[bytes]:
    """``path`` opened for writing from the start (a log that a child process streams into).

    A log cannot be written atomically, so this opens it with ``O_NOFOLLOW``: a symbolic link at
    ``path`` (say, planted in a shared folder) is refused with a ConfigError instead of being
    followed onto its target, and so is anything that is not a regular file (a FIFO would block).
    """
    raw = os.fspath(path)
    try:
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_NOFOLLOW | _O_CLOEXEC | getattr(os, "O_NONBLOCK", 0), 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(raw, "", f"refusing to write the {what} through a symbolic link") from None
        raise ConfigError(raw, "", f"cannot write {what}: {exc.strerror or exc}") from None
    except ValueError:  # a NUL character in the name
        raise ConfigError(repr(raw), "", f"cannot write {what}: not a valid file name") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(raw, "", f"refusing to write the {what} into something that is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "wb")


# --------------------------------------------------------------------------------------------------
# Field checks
# --------------------------------------------------------------------------------------------------


def table_field(src: str, where: str, value: Any) -> dict[str, Any]:
    """``value`` as a table (dict)."""
    if not isinstance(value, Mapping):
        raise ConfigError(src, where, f"must be a table, got {type(value).__name__}")
    return dict(value)


def array_field(src: str, where: str, value: Any) -> list[Any]:
    """``value`` as an array of tables (list)."""
    if not isinstance(value, list):
        raise ConfigError(src, where, f"must be an array of tables, got {type(value).__name__}")
    return value


def no_unknown_keys(src: str, where: str, table: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """Every key of ``table`` is in ``allowed``; the error names the first stranger."""
    for key in table:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise ConfigError(src, f"{prefix}{key}", f"unknown field (expected one of: {', '.join(allowed)})")


def required_field(src: str, where: str, table: Mapping[str, Any], key: str) -> Any:
    """``table[key]``; ConfigError "missing required field" naming ``where.key``."""
    if key not in table:
        prefix = f"{where}." if where else ""
        raise ConfigError(src, f"{prefix}{key}", "missing required field")
    return table[key]


def int_field(src: str, where: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (not a bool), optionally within ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(src, where, f"must be an integer, got {short_repr(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if lo is not None and hi is not None else (f">= {lo}" if lo is not None else f"<= {hi}")
        raise ConfigError(src, where, f"must be an integer {bound}, got {short_repr(value)}")
    return value


def str_field(src: str, where: str, value: Any) -> str:
    """A string."""
    if not isinstance(value, str):
        raise ConfigError(src, where, f"must be a string, got {short_repr(value)}")
    return value


def name_field(src: str, where: str, value: Any) -> str:
    """A name printed to people: a non-empty, printable string of at most 200 characters."""
    s = str_field(src, where, value)
    if not s:
        raise ConfigError(src, where, "must be a non-empty string")
    if len(s) > _MAX_NAME_LEN:
        raise ConfigError(src, where, f"longer than {_MAX_NAME_LEN} characters")
    if not s.isprintable():
        raise ConfigError(src, where, f"contains control or non-printable characters: {short_repr(s)}")
    return s


def bool_field(src: str, where: str, value: Any) -> bool:
    """True or false."""
    if not isinstance(value, bool):
        raise ConfigError(src, where, f"must be true or false, got {short_repr(value)}")
    return value


def number_field(src: str, where: str, value: Any, *, minimum: str, unit: str) -> float:
    """A finite real number, > 0 (``minimum="positive"``) or >= 0 (``"nonnegative"``), in ``unit``.

    Units listed in :data:`PHYSICAL_LIMITS` are also bounded above. The message shows the value as
    given (``got -5``, not ``got -5.0``). Returns it as float.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(src, where, f"must be a number ({unit}), got {short_repr(value)}")
    try:
        as_float = float(value)
    except OverflowError:
        raise ConfigError(src, where, f"out of range ({unit}): an integer too large for a float") from None
    if not math.isfinite(as_float):
        raise ConfigError(src, where, f"must be finite, got {short_repr(value)}")
    if minimum == "positive" and not as_float > 0:
        raise ConfigError(src, where, f"must be > 0 {unit}, got {short_repr(value)}")
    if minimum == "nonnegative" and not as_float >= 0:
        raise ConfigError(src, where, f"must be >= 0 {unit}, got {short_repr(value)}")
    limit = PHYSICAL_LIMITS.get(unit)
    if limit is not None and as_float > limit:
        raise ConfigError(src, where, f"must be <= {limit:g} {unit} (physically implausible), got {short_repr(value)}")
    return as_float


def node_ref_field(src: str, where: str, value: Any, n: int, allowed: Sequence[str] = (SOURCE, SINK)) -> NodeRef:
    """A node id ``0..n-1`` or one of the coordinator names in ``allowed``."""
    names = "".join(f" or {a!r}" for a in allowed)
    if isinstance(value, str):
        if value in allowed:
            return value
        raise ConfigError(src, where, f"unknown endpoint {short_repr(value)} (expected a node id{names})")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(src, where, f"must be a node id{names}, got {short_repr(value)}")
    if not 0 <= value < n:
        raise ConfigError(src, where, f"unknown node {short_repr(value)} (cluster has nodes 0..{n - 1})")
    return value
