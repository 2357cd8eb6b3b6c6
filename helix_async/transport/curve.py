"""ZeroMQ CURVE keys: authenticated, encrypted links between the host and its workers.

A key directory (``python -m helix_async keys generate DIR --workers N``) holds, in ZeroMQ's
certificate format (``zmq.auth``)::

    DIR/host.key            the host's public key           (every machine)
    DIR/host.key_secret     the host's key pair             (the host's machine only)
    DIR/worker-3.key        a worker's public key            (every machine)
    DIR/worker-3.key_secret a worker's key pair              (that worker's machine only)
    DIR/allowed/            the public keys allowed to connect: the host's and every worker's

Every endpoint's inbox is a CURVE server with its own key pair and accepts only clients whose
public key is in ``allowed/`` (a ZAP handler, ``zmq.auth``'s); every outbox is a CURVE client that
knows its server's public key.  The host's public key comes from ``DIR/host.key``; a worker's
travels with its address: with CURVE on, an endpoint's address reads ``tcp://HOST:PORT#curve=HEX``
(its public key in hex), so the registration and the next-hop lists carry the keys with the
addresses and nothing else changes.  A client whose key is not allowed fails the handshake: it is
refused, counted (``ZmqStats.auth_failures``, from the inbox's socket monitor), and nothing it
sends reaches the node.

A key is also an identity.  The allow-list's file names bind each key to the one endpoint it may
speak for (:func:`key_bindings`): ``allowed/host.key`` is the host, ``allowed/worker-N.key`` is
node ``N`` and nothing else, and any other ``allowed/NAME.key`` is a client bound to no node (it
may connect; the host refuses it a node).  The inbox names a sender by the key it authenticated
with (ZAP's ``User-Id``), never by the ZeroMQ identity the sender chose: a worker holding
``worker-3``'s key is node 3 to everyone, whatever it claims.  (docs/security.md)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

__all__ = ["CurveKeys", "check_address", "generate_keys", "is_local", "key_bindings", "key_files", "load_keys", "run_keys",
           "security", "split_address", "warn_plaintext", "write_key_files"]

_FRAGMENT = "#curve="


@dataclass(frozen=True)
class CurveKeys:
    """One endpoint's CURVE material: its key pair (z85 bytes), the directory of allowed client
    keys, and the public key of the servers it dials when their address names none (the host's)."""

    public: bytes
    secret: bytes
    allowed_dir: str
    default_server: bytes | None = None

    def address(self, endpoint: str) -> str:
        """``endpoint`` with this endpoint's public key attached."""
        return endpoint + _FRAGMENT + self.public.hex()


def split_address(address: str) -> tuple[str, bytes | None]:
    """(the ZeroMQ endpoint, the server's public key in z85 or None) of an address."""
    base, sep, key = address.partition(_FRAGMENT)
    if not sep:
        return address, None
    try:
        raw = bytes.fromhex(key)
    except ValueError:
        raise ConfigError(address, "address", "the #curve= part is not a hex public key") from None
    if len(raw) != 40:
        raise ConfigError(address, "address", f"a CURVE public key is 40 z85 characters, got {len(raw)}")
    return base, raw


def key_bindings(allowed_dir: str | os.PathLike[str]) -> dict[bytes, str | int]:
    """Every allowed public key (z85, as ZAP's ``User-Id`` gives it) and what it may speak for:
    ``"host"`` (``host.key``), a node id (``worker-N.key``: node N only), or ``"key:NAME"`` (any
    other ``NAME.key``: a client bound to no node).  A file that is not a certificate is skipped
    (ZeroMQ's authenticator skips it too)."""
    import zmq.auth

    out: dict[bytes, str | int] = {}
    d = Path(allowed_dir)
    for path in sorted(d.glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(str(path))
        except (ValueError, OSError):
            continue
        name = path.name[: -len(".key")]
        num = name[len("worker-"):] if name.startswith("worker-") else ""
        if name == "host":
            out[public] = "host"
        elif num.isascii() and num.isdigit() and len(num) < 10:
            out[public] = int(num)
        else:
            out[public] = "key:" + name
    return out


def check_address(address: str, key: bytes | None) -> str:
    """Why ``address`` cannot be a worker's inbox address ("" when it can): a ``tcp://HOST:PORT``
    endpoint (port 1..65535) whose ``#curve=`` part names exactly ``key`` (the sender's
    authenticated public key, z85), or names none when ``key`` is None (plaintext links)."""
    if len(address) > 512:
        return "longer than 512 characters"
    try:
        endpoint, named = split_address(address)
    except ConfigError as e:
        return e.args[-1] if e.args else "a malformed #curve= part"
    if not endpoint.startswith("tcp://"):
        return "not a tcp:// endpoint"
    host, sep, port = endpoint[len("tcp://"):].rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return "not tcp://HOST:PORT with a port in 1..65535"
    if any(c.isspace() or c in "*;#/" for c in host):
        return "the host part is not a host name or address"
    if key is None and named is not None:
        return "names a CURVE key, but the links are plaintext"
    if key is not None and named != key:
        return "its CURVE key is not the key the registrant authenticated with"
    return ""


def _read(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if not path.is_file():
        raise ConfigError(str(path), "--keys", "no such key file (python -m helix_async keys generate DIR makes them)")
    try:
        public, sec = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as e:
        raise ConfigError(str(path), "--keys", f"not a ZeroMQ certificate: {e}") from None
    if secret and not sec:
        raise ConfigError(str(path), "--keys", "holds no secret key")
    return public, sec


def load_keys(directory: str | os.PathLike[str], name: str, *, host_key: bool = True) -> CurveKeys:
    """The keys of endpoint ``name`` (``host`` or ``worker-N``) from a key directory."""
    d = Path(directory)
    allowed = d / "allowed"
    if not allowed.is_dir():
        raise ConfigError(str(d), "--keys", "no allowed/ directory of public keys in it")
    public, secret = _read(d / f"{name}.key_secret", secret=True)
    assert secret is not None
    server = None
    if host_key and name != "host":
        server, _ = _read(d / "host.key", secret=False)
    return CurveKeys(public, secret, str(allowed), server)


def generate_keys(directory: str | os.PathLike[str], workers: int) -> list[Path]:
    """A host key pair and ``workers`` worker key pairs, with every public key in ``allowed/``."""
    import tempfile

    import zmq.auth

    from ..fileio import atomic_write_bytes

    d = Path(directory)
    allowed = d / "allowed"
    allowed.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ["host", *(f"worker-{i}" for i in range(workers))]:
        if os.path.lexists(d / f"{name}.key_secret"):
            raise ConfigError(str(d / f"{name}.key_secret"), "keys generate", "exists; refusing to overwrite a key")
        # Made in a private folder (mode 700), then written into place by fileio: the secret has
        # mode 600 before it has its name, and no file is written through a symbolic link.
        with tempfile.TemporaryDirectory(dir=d, prefix=".keys-") as tmp:
            public, secret = (Path(f) for f in zmq.auth.create_certificates(tmp, name))
            public_text, secret_text = public.read_bytes(), secret.read_bytes()
        written.append(atomic_write_bytes(d / public.name, public_text, "public key", mode=0o644, flag="keys generate"))
        written.append(atomic_write_bytes(d / secret.name, secret_text, "secret key", mode=0o600, flag="keys generate"))
        atomic_write_bytes(allowed / public.name, public_text, "public key", mode=0o644, flag="keys generate")
    return written


@contextmanager
def run_keys(workers: int) -> Iterator[str]:
    """Keys for one run (``serve``, ``demo``, ``launch``, tests' local clusters): a host key pair
    and ``workers`` worker key pairs in a fresh private directory (mode 700, ``tempfile.mkdtemp``),
    removed when the run ends; yields its path."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="helix-keys-")
    try:
        generate_keys(d, workers)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def key_files(directory: str | os.PathLike[str], name: str) -> dict[str, str]:
    """What endpoint ``name`` (``host`` or ``worker-N``) needs of a key directory, to copy to its
    machine: relative path -> text (its own key pair, the host's public key, the allow-list)."""
    d = Path(directory)
    out = {f"{name}.key_secret": (d / f"{name}.key_secret").read_text(), f"{name}.key": (d / f"{name}.key").read_text(),
           "host.key": (d / "host.key").read_text()}
    for p in sorted((d / "allowed").glob("*.key")):
        out[f"allowed/{p.name}"] = p.read_text()
    return out


def write_key_files(directory: str | os.PathLike[str], files: dict[str, str]) -> str:
    """Write :func:`key_files`' output under ``directory`` (created mode 700; secret keys mode 600);
    returns the directory."""
    d = Path(directory)
    (d / "allowed").mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    for rel, text in files.items():
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise ValueError(f"{rel!r}: not a path inside the key directory")
        path = d / rel
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600 if rel.endswith("_secret") else 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return str(d)


def warn_plaintext(who: str) -> None:
    """One warning that ``who``'s links are plaintext (``--insecure``), logged once it serves."""
    import logging

    logging.getLogger("helix_async.security").warning(
        "%s serves over plaintext links (--insecure): any process that can reach its ports can read them and pose "
        "as any peer (docs/security.md)", who)


def is_local(endpoint: str) -> bool:
    """Whether a ZeroMQ endpoint stays on this machine (loopback TCP, ipc, inproc)."""
    base, _ = split_address(endpoint)
    if base.startswith(("ipc://", "inproc://")):
        return True
    if not base.startswith("tcp://"):
        return False
    host = base[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def security(keys_dir: str | None, name: str, endpoints: list[tuple[str, str]], insecure: bool) -> CurveKeys | None:
    """The CURVE keys of endpoint ``name`` from ``--keys``, or None for plaintext links, which take
    an explicit ``--insecure``, even on loopback (warned: any local process could then pose as any
    peer, docs/security.md; here for links off this machine, by the host and the worker once they
    serve for loopback, so that a bad input still ends in one line).  endpoints: (flag, endpoint)
    the process binds or dials."""
    import logging

    if keys_dir:
        if insecure:
            raise ConfigError("<argument>", "--insecure", "give either --keys or --insecure, not both")
        return load_keys(keys_dir, name)
    remote = [(flag, e) for flag, e in endpoints if not is_local(e)]
    if not insecure:
        if remote:
            flag, e = remote[0]
            what = f"{flag}: {split_address(e)[0]} leaves this machine"
        else:
            e = endpoints[0][1] if endpoints else "the link"
            what = f"--keys: {split_address(e)[0]} is a plaintext link"
        flag, _, text = what.partition(": ")
        raise ConfigError("<argument>", flag, f"{text}: give --keys DIR (CURVE, python -m helix_async keys generate) or, "
                          "knowingly, --insecure")
    if remote:
        logging.getLogger("helix_async.security").warning(
            "--insecure: links to and from %s are neither encrypted nor authenticated",
            ", ".join(e for _, e in remote))
    # (on loopback the host and the worker warn once they serve: a bad input still ends in one line)
    return None
