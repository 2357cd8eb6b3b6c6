"""The HTTP front door in a host process: its flags checked before anything listens, then the
OpenAI-compatible API and its metrics started on the host's own event loop.

The ``host --http`` and ``serve`` commands both use it.  The front door itself
(:mod:`helix_async.frontend.openai_api`) knows only the serving-host protocol; this module is
where the runtime's :class:`~helix_async.runtime.host_main.HostServer` is handed to it (docs/frontend.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..frontend.openai_api import OpenAIServer
    from ..frontend.tokenizer import TextTokenizer
    from ..model import ModelSpec
    from .host_main import HostServer

__all__ = ["MAX_MODEL_LEN", "FrontDoor", "prepare_front_door", "start_front_door"]

#: context lengths of the models we know (tokens): the default of ``--max-model-len``
MAX_MODEL_LEN = {"tiny-llama": 2048, "llama2-70b": 4096, "llama1-30b": 2048}
#: the context length of a model not in :data:`MAX_MODEL_LEN` (tokens)
DEFAULT_MAX_MODEL_LEN = 2048


@dataclass(frozen=True)
class FrontDoor:
    """What the HTTP API needs, checked: where it listens (``host``, ``port``; 0: any free port),
    the tokenizer (None: token ids only), ``max_model_len`` (prompt plus output tokens at most),
    the model id clients give (``model_name``), the seed of unseeded requests' sampling, the
    bearer token ``/v1/`` requires (None: none) and what the model was resolved from
    (``model_root``: its name or file, ``/v1/models``' ``root``)."""

    host: str
    port: int
    tokenizer: TextTokenizer | None
    max_model_len: int
    model_name: str
    seed: int = 0
    api_key: str | None = None
    model_root: str = ""
    admin_key: str | None = None


def prepare_front_door(
    http: str,
    model: ModelSpec,
    *,
    tokenizer: str | None = None,
    max_model_len: int | None = None,
    served_model_name: str | None = None,
    seed: int = 0,
    api_key: str | None = None,
    admin_key: str | None = None,
) -> FrontDoor:
    """Check the front door's flags and load its tokenizer, before the host binds anything.

    http: ``HOST:PORT`` (``--http``). model: the plan's model. tokenizer: ``--tokenizer``
    (``tiny-llama``, a directory with ``tokenizer.json``, or ``none``; None: the model's own when
    one ships). admin_key: ``--admin-key``, the operator's token for ``/admin/`` (None: not
    served). Raises ConfigError naming the flag (the command exits 2)."""
    from ..extras import require

    require("aiohttp", "serve")
    from ..frontend.openai_api import parse_http_address

    try:
        host, port = parse_http_address(http)
    except ValueError as e:
        raise ConfigError("<argument>", "--http", str(e)) from None
    # the model's own tokenizer: the shipped one of tiny-llama, else the checkpoint's (its
    # directory's tokenizer files or the GGUF's tokenizer metadata)
    tok_src = tokenizer or (model.name if model.name == "tiny-llama" else (model.checkpoint or None))
    tok = None
    if tok_src and tok_src != "none":
        from ..frontend.tokenizer import TINY_NAMES, load_tokenizer

        if tok_src in TINY_NAMES and model.checkpoint:
            # our BPE is trained on our docs for the dummy model: a real model's ids would be noise
            raise ConfigError("<argument>", "--tokenizer", f"the tiny-llama tokenizer is for the dummy tiny-llama only; "
                              f"{model.name} brings its own (leave --tokenizer out)")
        tok = load_tokenizer(tok_src)
        if tok.vocab_size > model.vocab_size:
            raise ConfigError(tok_src, "--tokenizer", f"{tok.vocab_size} ids, more than {model.name}'s vocabulary "
                              f"of {model.vocab_size}")
    if admin_key is not None and (not admin_key or admin_key == api_key):
        raise ConfigError("<argument>", "--admin-key", "give a key of its own (not empty, not the --api-key)")
    return FrontDoor(host, port, tok, max_model_len or default_max_model_len(model),
                     served_model_name or model.name, seed, api_key, model.reference, admin_key)


def default_max_model_len(model: ModelSpec) -> int:
    """``--max-model-len``'s default: a built-in model's context, or a model file's trained context
    (``max_position_embeddings``; Mistral's sliding window when smaller), at most 8192 tokens (a
    longer context is opted into with the flag)."""
    if model.name in MAX_MODEL_LEN:
        return MAX_MODEL_LEN[model.name]
    arch = model.arch
    if arch is None:
        return DEFAULT_MAX_MODEL_LEN
    n = int(arch.max_position)
    if arch.sliding_window:
        n = min(n, int(arch.sliding_window))
    return min(n, 8192)


async def start_front_door(server: HostServer, door: FrontDoor) -> OpenAIServer:
    """Serve the API (with ``/metrics``) for ``server``; returns it listening (``.url``).  A port
    that is not free shuts the host down and raises ConfigError naming ``--http``."""
    from ..frontend.metrics import Metrics
    from ..frontend.openai_api import OpenAIServer

    api = OpenAIServer(server, door.model_name, door.tokenizer, max_model_len=door.max_model_len, seed=door.seed,
                       metrics=Metrics(server), api_key=door.api_key, model_root=door.model_root or None,
                       admin_key=door.admin_key)
    try:
        await api.start(door.host, door.port)
    except OSError as e:
        await server.shutdown("the HTTP port is not free", grace=0.0)
        raise ConfigError("<argument>", "--http", f"cannot listen on {door.host}:{door.port}: {e.strerror or e}") from None
    return api
