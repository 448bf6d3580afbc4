"""The API key file (``auth.keys_file``): its format, the key hash, loading, and atomic saving.

The file is YAML, readable by people, one entry per key under its name::

    # ollamux API keys ...
    keys:
      webui:
        sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        models: []               # [] = every model; else only these (Ollama's names)
        inference_only: false    # true: no pull, push, create, copy, delete, blobs
        created: "2026-12-07T22:30:00Z"

Only a hash of each key is stored; the key itself is printed once, by ``ollamux keys add``.

The hash is plain SHA-256 of the key. A key is ``olx_`` followed by 32 random bytes from
:mod:`secrets` (256 bits), so there is nothing to guess and nothing to look up in a table: a slow
password hash (scrypt, argon2) exists to protect short, guessable secrets, and on a key this long
it would add no strength while costing tens of milliseconds of CPU on every request. A salt or an
HMAC would likewise add nothing to a 256-bit random input. Presented keys are hashed and compared
against every stored hash with :func:`hmac.compare_digest`.

The file is written whole to a temporary file beside it and renamed over it (readers never see
half a file), with mode 0600. A running proxy reloads it when it changes (see ``api/auth.py``).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proxy.errors import ApiKeyError, ConfigError
from proxy.names import is_valid, model_key, normalize

__all__ = [
    "PREFIX",
    "ApiKey",
    "KeySet",
    "add_key",
    "hash_key",
    "load_keys",
    "new_key",
    "revoke_key",
    "save_keys",
]

PREFIX = "olx_"
"""Every key starts with this, so a leaked one is easy to recognise (and to search for)."""
RESERVED = frozenset({"anonymous", "none", "-"})
"""Names a key may not have: they are label values of ``ollamux_key_requests_total``."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_HEX = re.compile(r"[0-9a-f]{64}")
_FIELDS = ("sha256", "models", "inference_only", "created")
HEADER = """\
# ollamux API keys (the file named by auth.keys_file). Only SHA-256 hashes of the keys are kept
# here: the file cannot be used to call the proxy. Managed with `ollamux keys add|list|revoke`;
# a running proxy reloads it within seconds of a change (or on SIGHUP).
"""


@dataclass(frozen=True, kw_only=True)
class ApiKey:
    """One key as the file describes it: its name, hash and limits (never the key itself)."""

    name: str
    sha256: str
    """Hex SHA-256 of the key."""
    models: tuple[str, ...] = ()
    """Models it may use (Ollama's display form); empty = every model."""
    inference_only: bool = False
    """No model management: pull, push, create, copy, delete, blobs."""
    created: str = ""

    def allows(self, model: str) -> bool:
        """Whether this key may use ``model`` (names compare as Ollama compares them)."""
        return not self.models or model_key(model) in {model_key(m) for m in self.models}


@dataclass(frozen=True)
class KeySet:
    """The keys of one version of the file."""

    keys: tuple[ApiKey, ...] = ()
    _digests: tuple[tuple[bytes, ApiKey], ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        pairs = tuple((bytes.fromhex(k.sha256), k) for k in self.keys)
        object.__setattr__(self, "_digests", pairs)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def names(self) -> list[str]:
        return [k.name for k in self.keys]

    def get(self, name: str) -> ApiKey | None:
        return next((k for k in self.keys if k.name == name), None)

    def match(self, presented: str) -> ApiKey | None:
        """The key whose hash is that of ``presented``, else None; compares with every one."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = None
        for stored, key in self._digests:
            if hmac.compare_digest(stored, digest):
                found = key
        return found


def new_key() -> str:
    """A fresh random key: ``olx_`` and 32 random bytes, URL-safe base64 (47 characters)."""
    return PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The hex SHA-256 the file stores for ``key``."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def check_name(name: str) -> None:
    """ConfigError unless ``name`` can name a key (it becomes a metric label and a log field)."""
    if not _NAME.fullmatch(name) or name in RESERVED:
        raise ConfigError(
            f"{name!r} cannot name a key: use 1 to 64 letters, digits, '.', '_' or '-', starting "
            f"with a letter or digit, and not {', '.join(sorted(RESERVED))}; e.g. open-webui"
        )


# --- reading -------------------------------------------------------------------------------------


def load_keys(path: str | Path) -> KeySet:
    """Read and check the key file; ConfigError naming the file and the entry if it is wrong."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "the key file does not exist; create it with: ollamux keys add NAME --config CONFIG",
            source=source,
        ) from None
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read the key file ({reason})", source=source) from None
    try:
        return parse_keys(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"not valid YAML: {problem}", source=source, path=where) from None
    except ConfigError as exc:
        raise ConfigError(_bare(exc), source=source, path=exc.path) from None


def parse_keys(text: str) -> KeySet:
    """The keys of a file's text; ConfigError (with the entry's path) or YAMLError if wrong."""
    raw = yaml.safe_load(text)
    if raw is None:
        return KeySet()
    if not isinstance(raw, dict) or set(raw) - {"keys"}:
        raise ConfigError("must be a mapping with one key, keys: (a mapping of name to key)")
    entries = raw.get("keys") or {}
    if not isinstance(entries, dict):
        raise ConfigError("must be a mapping of key names to entries", path="keys")
    return KeySet(tuple(_entry(str(name), value) for name, value in entries.items()))


def _entry(name: str, value: object) -> ApiKey:
    where = f"keys.{name}"
    try:
        check_name(name)
    except ConfigError as exc:
        raise ConfigError(str(exc), path=where) from None
    if not isinstance(value, dict):
        raise ConfigError("must be a mapping with sha256, models, inference_only", path=where)
    unknown = sorted(str(k) for k in set(value) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown field {unknown[0]!r}; known: {', '.join(_FIELDS)}", path=where)
    digest = value.get("sha256")
    if not isinstance(digest, str) or not _HEX.fullmatch(digest.lower()):
        raise ConfigError("must be 64 hex digits (the key's SHA-256)", path=f"{where}.sha256")
    models = value.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, str) and is_valid(m) for m in models):
        raise ConfigError(
            "must be a list of model names, e.g. [llama3.2, qwen3:8b]", path=f"{where}.models"
        )
    inference_only = value.get("inference_only", False)
    if not isinstance(inference_only, bool):
        raise ConfigError("must be true or false", path=f"{where}.inference_only")
    created = value.get("created", "")
    return ApiKey(
        name=name,
        sha256=digest.lower(),
        models=tuple(normalize(m) for m in models),
        inference_only=inference_only,
        created=str(created),
    )


def _bare(exc: ConfigError) -> str:
    """The message of ``exc`` without the ``path:`` prefix ConfigError put in front of it."""
    text = str(exc)
    return text[len(exc.path) + 2 :] if exc.path and text.startswith(exc.path + ": ") else text


# --- writing -------------------------------------------------------------------------------------


def render_keys(keys: KeySet) -> str:
    """The file's text for ``keys``: the header comment and one entry per key."""
    tree: dict[str, Any] = {
        "keys": {
            k.name: {
                "sha256": k.sha256,
                "models": list(k.models),
                "inference_only": k.inference_only,
                "created": k.created,
            }
            for k in keys.keys
        }
    }
    if not keys.keys:
        return HEADER + "keys: {}\n"
    return HEADER + yaml.safe_dump(tree, sort_keys=False, default_flow_style=None, width=100)


def save_keys(path: str | Path, keys: KeySet) -> None:
    """Write the file atomically (a temporary file beside it, renamed over it), mode 0600."""
    target = Path(path)
    directory = target.parent
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise ApiKeyError(f"{path}: cannot write the key file ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), 0o600)
            _keep_owner(target, out.fileno())
            out.write(render_keys(keys))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(exc, OSError):
            raise ApiKeyError(f"{path}: cannot write the key file ({exc.strerror})") from None
        raise
    # The rename itself survives a crash once the directory is synced.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _keep_owner(target: Path, fd: int) -> None:
    """Give the new file the old one's owner (root editing the file of the ``ollama`` user)."""
    with contextlib.suppress(OSError):  # no old file, or not allowed: the writer owns it
        st = target.stat()
        os.fchown(fd, st.st_uid, st.st_gid)


# --- operations ----------------------------------------------------------------------------------


def add_key(
    path: str | Path, name: str, *, models: Sequence[str] = (), inference_only: bool = False
) -> str:
    """Add a key named ``name`` to the file (created if missing) and return the key, once."""
    check_name(name)
    for model in models:
        if not is_valid(model):
            raise ConfigError(f"{model!r} is not a valid model name; e.g. llama3.2 or qwen3:8b")
    keys = load_keys(path) if Path(path).exists() else KeySet()
    if keys.get(name) is not None:
        raise ApiKeyError(
            f"{path}: a key named {name!r} exists already; revoke it first "
            f"(ollamux keys revoke {name}) or pick another name"
        )
    key = new_key()
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    entry = ApiKey(
        name=name,
        sha256=hash_key(key),
        models=tuple(dict.fromkeys(normalize(m) for m in models)),
        inference_only=inference_only,
        created=created,
    )
    save_keys(path, KeySet((*keys.keys, entry)))
    return key


def revoke_key(path: str | Path, name: str) -> None:
    """Remove the key named ``name`` from the file; ApiKeyError if there is none."""
    keys = load_keys(path)
    if keys.get(name) is None:
        known = ", ".join(keys.names()) or "none"
        raise ApiKeyError(f"{path}: no key named {name!r}; the keys are: {known}")
    save_keys(path, KeySet(tuple(k for k in keys.keys if k.name != name)))
