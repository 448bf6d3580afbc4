"""The API key file (proxy/keystore.py), its live reload, how bodies are read for model limits."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from proxy.api.auth import LiveKeys, body_models
from proxy.config import load_config
from proxy.errors import ApiKeyError, ConfigError
from proxy.keystore import PREFIX, add_key, hash_key, load_keys, revoke_key


def test_add_list_revoke_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    full = add_key(path, "webui")
    limited = add_key(path, "bot", models=["llama3.2", "qwen3:8b"], inference_only=True)
    assert full.startswith(PREFIX) and len(full) == len(PREFIX) + 43 and full != limited
    keys = load_keys(path)
    assert keys.names() == ["webui", "bot"]
    bot = keys.get("bot")
    assert bot is not None and bot.models == ("llama3.2:latest", "qwen3:8b") and bot.inference_only
    assert bot.created.endswith("Z")
    assert keys.match(full) == keys.get("webui") and keys.match(limited) == bot
    assert keys.match(full + "x") is None and keys.match("") is None
    revoke_key(path, "webui")
    keys = load_keys(path)
    assert keys.names() == ["bot"] and keys.match(full) is None and keys.match(limited) == bot


def test_only_hashes_on_disk_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "webui")
    text = path.read_text()
    assert key not in text and key.removeprefix(PREFIX) not in text
    assert hash_key(key) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    add_key(path, "second")  # rewritten whole: still 0600, no temporary file left beside it
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.yaml"]


def test_names_are_checked_and_unique(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    add_key(path, "webui")
    with pytest.raises(ApiKeyError, match="a key named 'webui' exists already"):
        add_key(path, "webui")
    for bad in ("", "a b", "anonymous", "-x", "é"):
        with pytest.raises(ConfigError, match="cannot name a key"):
            add_key(path, bad)
    with pytest.raises(ConfigError, match="not a valid model name"):
        add_key(path, "ok", models=["bad model"])
    with pytest.raises(ApiKeyError, match="no key named 'nope'; the keys are: webui"):
        revoke_key(path, "nope")
    assert load_keys(path).names() == ["webui"]


def test_model_names_compare_as_ollama_compares_them(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    add_key(path, "bot", models=["Llama3.2", "library/qwen3:8b"])
    bot = load_keys(path).get("bot")
    assert bot is not None
    assert bot.allows("llama3.2") and bot.allows("llama3.2:latest") and bot.allows("LLAMA3.2")
    assert bot.allows("registry.ollama.ai/library/qwen3:8b") and bot.allows("qwen3:8b")
    assert not bot.allows("llama3.2:1b") and not bot.allows("qwen3") and not bot.allows("")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("keys: [a, b]\n", "keys: must be a mapping"),
        ("other: 1\n", "must be a mapping with one key"),
        ("keys:\n  w:\n    sha256: abc\n", "keys.w.sha256: must be 64 hex digits"),
        ("keys:\n  w:\n    sha256: " + "a" * 64 + "\n    model: [x]\n", "unknown field 'model'"),
        ("keys:\n  w:\n    sha256: " + "a" * 64 + "\n    models: ['a b']\n", "keys.w.models"),
        ("keys:\n  'a b':\n    sha256: " + "a" * 64 + "\n", "keys.a b: 'a b' cannot name"),
        ("keys: {w: [\n", "not valid YAML"),
    ],
)
def test_a_malformed_file_names_itself_and_the_entry(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_keys(path)
    assert str(caught.value).startswith(f"{path}: ") and where in str(caught.value)


def test_missing_file_is_an_error_and_empty_file_has_no_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; create it with: ollamux keys add"):
        load_keys(tmp_path / "absent.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert not load_keys(tmp_path / "empty.yaml")


def test_reload_keeps_the_old_keys_when_the_file_breaks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "webui")
    live = LiveKeys(str(path))
    assert not live.refresh()  # unchanged: not read again
    path.write_text("keys: {webui: 3}\n")
    with caplog.at_level(logging.ERROR, logger="ollamux.auth"):
        assert not live.refresh()
    assert live.keys.match(key) is not None
    assert f"{path}: keys.webui: must be a mapping" in caplog.text and key not in caplog.text
    os.unlink(path)
    assert not live.refresh() and live.keys.match(key) is not None  # a missing file: kept too
    second = add_key(path, "other")
    assert live.refresh()
    assert live.keys.match(key) is None and live.keys.match(second) is not None


def test_keys_file_is_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "ollamux.yaml"
    config.write_text("auth:\n  keys_file: keys.yaml\n  protect_status: true\n")
    loaded = load_config(config)
    assert loaded.auth.keys_file == str(tmp_path / "conf" / "keys.yaml")
    assert loaded.auth.protect_status
    config.write_text("auth:\n  keys: x\n")
    with pytest.raises(
        ConfigError, match=r"auth\.keys: unknown key 'keys'; did you mean 'keys_file'"
    ):
        load_config(config)


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (b'{"model": "a", "prompt": "x"}', ["a"]),
        (b"", []),
        (b"[1, 2]", []),
        (b'{"Model": "b"}', ["b"]),  # Go matches keys case-insensitively
        (b'{"model": "a", "model": null}', ["a"]),  # a null leaves Go's earlier value
        (b'{"model": "a", "MODEL": "b"}', ["a", "b"]),
        (b'{"source": "a", "destination": "b"}', ["a", "b"]),
        (b'{"model": "n", "from": "base"}', ["n", "base"]),
        (b'{"\\u006dodel": "c"}', ["c"]),  # escaped key
        (b'  {"model": "a"} trailing', ["a"]),  # Ollama's decoder stops after the first value
        (b'{"model": "a", "prompt": "\xff"}', ["a"]),  # invalid UTF-8 is read, as Go reads it
        (b'{"model": 3}', []),
        (b"{bad", None),
        (b'{"model": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    ],
)
def test_body_models_reads_bodies_as_ollama_does(body: bytes, names: list[str] | None) -> None:
    assert body_models(body) == names


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_rewrites_keep_the_files_owner(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    add_key(path, "webui")
    os.chown(path, 65534, 65534)  # e.g. the service's user; root runs `ollamux keys`
    add_key(path, "second")
    assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
