"""`ollamux keys add|list|revoke`: manage the API keys in the config's ``auth.keys_file``.

``add`` prints the new key alone on stdout (so ``KEY=$(ollamux keys add NAME --config F)`` works)
and what it did on stderr; the key is never shown again. Exit codes as elsewhere in the CLI:
2 for a bad name, a bad model name, a config without ``auth.keys_file`` or a key file that does
not read; 1 when the name is taken (add) or unknown (revoke), or the file cannot be written.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from proxy.cli_help import Subparsers
from proxy.errors import ConfigError

if TYPE_CHECKING:  # the parser is built for every command: the rest loads on use
    from proxy.config import Config
    from proxy.keystore import KeySet

__all__ = ["NAME", "keys_file", "register", "run", "table"]

NAME = "keys"


def register(commands: Subparsers) -> None:
    """The ``keys`` subcommand and its actions."""
    keys = commands.add_parser(
        NAME,
        help="add, list or revoke the API keys clients need (auth.keys_file)",
        description="Manage the API keys of the proxy. Once the config's auth.keys_file holds a "
        "key, every request needs the header Authorization: Bearer KEY. Only hashes are stored.",
    )
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="create a key, print it once, store its hash")
    add.add_argument("name", metavar="NAME", help="who the key is for, e.g. open-webui")
    add.add_argument(
        "--models",
        default="",
        metavar="M1,M2",
        help="only these models (e.g. llama3.2,qwen3:8b); default: every model",
    )
    add.add_argument(
        "--inference-only",
        action="store_true",
        help="no model management (pull, push, create, copy, delete, blobs)",
    )
    listing = actions.add_parser("list", help="the keys: names, limits, when created")
    listing.add_argument("--json", action="store_true", help="as JSON")
    revoke = actions.add_parser(
        "revoke", help="delete a key; a running proxy refuses it within seconds"
    )
    revoke.add_argument("name", metavar="NAME", help="the key's name, as `keys list` shows it")
    for sub in (add, listing, revoke):
        sub.add_argument("--config", metavar="FILE", help="the config naming auth.keys_file")


def run(args: argparse.Namespace) -> None:
    """Add, revoke or list keys in the config's key file."""
    from proxy.config import Config, load_config
    from proxy.keystore import add_key, load_keys, revoke_key

    config = load_config(args.config) if args.config else Config()
    path = keys_file(config)
    if args.keys_command == "add":
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        key = add_key(path, args.name, models=models, inference_only=args.inference_only)
        print(key)
        limits = ", ".join(models) if models else "every model"
        only = "; inference only" if args.inference_only else ""
        print(
            f"added the key {args.name!r} to {path} ({limits}{only}). This is the only time "
            "the key is shown: store it now. A running proxy accepts it within seconds.",
            file=sys.stderr,
        )
    elif args.keys_command == "revoke":
        revoke_key(path, args.name)
        print(f"revoked the key {args.name!r} in {path}; a running proxy refuses it within seconds")
    else:
        keys = load_keys(path)
        sys.stdout.write(json.dumps(_entries(keys), indent=2) + "\n" if args.json else table(keys))


def keys_file(config: Config) -> str:
    """The config's ``auth.keys_file``; a ConfigError naming the field when it is not set."""
    if not config.auth.keys_file:
        raise ConfigError(
            "is not set, so there is no key file; set it in the config (e.g. auth: {keys_file: "
            "/etc/ollamux/keys.yaml}) and pass the config with --config FILE",
            source=config.source or "(no --config given)",
            path="auth.keys_file",
        )
    return config.auth.keys_file


def _entries(keys: KeySet) -> list[dict[str, object]]:
    return [
        {
            "name": k.name,
            "models": list(k.models),
            "inference_only": k.inference_only,
            "created": k.created,
        }
        for k in keys.keys
    ]


def table(keys: KeySet) -> str:
    """Names, limits and creation times, one key a line; never a hash."""
    if not keys:
        return "no keys: the proxy needs none (add one with: ollamux keys add NAME --config FILE)\n"
    rows = [("NAME", "MODELS", "INFERENCE ONLY", "CREATED")]
    for k in keys.keys:
        models = ",".join(k.models) or "(all)"
        rows.append((k.name, models, "yes" if k.inference_only else "no", k.created or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[3]])
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"
