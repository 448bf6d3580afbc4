"""Conventions an operator expects: OLLAMA_HOST, global flags, log lines, config errors, --help."""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import build_parser, main
from proxy.cli_help import EXAMPLES, subcommands
from proxy.config import load_config
from proxy.emulator.launch import EmulateOptions, plan_emulator
from proxy.errors import ConfigError
from proxy.logs import LogFormatter, setup_logging
from proxy.ollama_host import parse_ollama_host, url_from_env

REPO = Path(__file__).resolve().parents[2]

# --- OLLAMA_HOST ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("", ("http", "", 11434)),
        ("0.0.0.0", ("http", "0.0.0.0", 11434)),
        ("gpu-box", ("http", "gpu-box", 11434)),
        ("gpu-box:11500", ("http", "gpu-box", 11500)),
        (":11500", ("http", "", 11500)),
        ("[::1]:11500", ("http", "::1", 11500)),
        ("::1", ("http", "::1", 11434)),
        ("http://gpu-box", ("http", "gpu-box", 80)),
        ("https://gpu-box", ("https", "gpu-box", 443)),
        ("http://gpu-box:11500/path", ("http", "gpu-box", 11500)),
        (' "127.0.0.1:11500" ', ("http", "127.0.0.1", 11500)),
        ("gpu-box:nope", ("http", "gpu-box", 11434)),
    ],
)
def test_ollama_host_is_read_as_ollama_reads_it(value: str, parsed: tuple[str, str, int]) -> None:
    assert parse_ollama_host(value) == parsed


def test_the_cli_url_is_ollamux_url_then_ollama_host_then_local() -> None:
    assert url_from_env({}) == "http://127.0.0.1:11434"
    assert url_from_env({"OLLAMA_HOST": "0.0.0.0"}) == "http://127.0.0.1:11434"
    assert url_from_env({"OLLAMA_HOST": ":11500"}) == "http://127.0.0.1:11500"
    assert url_from_env({"OLLAMA_HOST": "https://box"}) == "https://box:443"
    assert url_from_env({"OLLAMA_HOST": "[::1]:9"}) == "http://[::1]:9"
    both = {"OLLAMA_HOST": "a:1", "OLLAMUX_URL": "b:2/"}
    assert url_from_env(both) == "http://b:2"


def test_emulate_listens_on_ollama_host_unless_a_flag_or_instance_says_otherwise() -> None:
    gpu = ("a:24",)
    plan = plan_emulator(EmulateOptions(gpus=gpu), {"OLLAMA_HOST": "127.0.0.1:11601"})
    assert (plan.host, plan.port) == ("127.0.0.1", 11601)
    plan = plan_emulator(EmulateOptions(gpus=gpu), {"OLLAMA_HOST": ":11602"})
    assert (plan.host, plan.port) == ("0.0.0.0", 11602)  # as `ollama serve`: every interface
    flagged = EmulateOptions(gpus=gpu, listen="127.0.0.1:11603")
    plan = plan_emulator(flagged, {"OLLAMA_HOST": "127.0.0.1:11601"})
    assert plan.port == 11603
    demo = EmulateOptions(config=str(REPO / "config" / "demo.yaml"), instance="gpu0")
    plan = plan_emulator(demo, {"OLLAMA_HOST": "127.0.0.1:11601"})
    assert plan.port != 11601  # the instance's own port


class _Proxy(http.server.BaseHTTPRequestHandler):
    """A stand-in proxy: /proxy/status and /proxy/instances, 404 for an unknown instance."""

    def do_GET(self) -> None:
        if self.path == "/proxy/status":
            self._answer(200, {"version": "test", "instances": [], "queues": {}, "recent": []})
        else:
            self._answer(200, {"instances": []})

    def do_POST(self) -> None:
        self._answer(404, {"error": "no instance 'nosuch'; the instances are gpu0, gpu1"})

    def _answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def proxy_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _dead_port() -> int:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Proxy)
    port = server.server_address[1]
    server.server_close()
    return port


def test_status_and_instances_talk_to_ollama_host(
    proxy_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OLLAMUX_URL", raising=False)
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{proxy_port}")
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "test"
    assert main(["instances", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"instances": []}
    monkeypatch.setenv("OLLAMA_HOST", f":{proxy_port}")  # as the ollama CLI: this machine
    assert main(["instances", "list", "--json"]) == 0


def test_an_explicit_url_wins_over_ollama_host(
    proxy_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{_dead_port()}")
    assert main(["status", "--json", "--url", f"127.0.0.1:{proxy_port}"]) == 0
    assert main(["status", "--json"]) == 1
    assert "cannot reach the proxy" in capsys.readouterr().err


# --- exit codes ----------------------------------------------------------------------------------


def test_an_unknown_instance_name_exits_2_with_the_proxys_message(
    proxy_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{proxy_port}"
    assert main(["instances", "drain", "nosuch", "--url", url]) == 2
    err = capsys.readouterr().err
    assert err == "ollamux: error: NAME: no instance 'nosuch'; the instances are gpu0, gpu1\n"


def test_a_missing_instance_name_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["instances", "drain"])
    assert exited.value.code == 2


def test_the_readme_documents_the_exit_codes_the_cli_uses() -> None:
    readme = (REPO / "README.md").read_text()
    assert "2 an invalid config or argument" in readme
    assert "1 an instance could\nnot be started" in readme or "1 an instance could not" in readme


# --- global flags --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "debug", "--log-format", "json", "config", "check", "x.yaml"],
        ["config", "--log-level", "debug", "check", "x.yaml", "--log-format", "json"],
        ["config", "check", "x.yaml", "--log-level", "debug", "--log-format", "json"],
        ["--log-format", "json", "config", "check", "--log-level", "debug", "x.yaml"],
    ],
)
def test_global_flags_go_before_or_after_the_subcommand(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.log_level, args.log_format, args.file) == ("debug", "json", "x.yaml")


def test_global_flags_default_when_not_given() -> None:
    args = build_parser().parse_args(["instances", "drain", "gpu1", "--wait"])
    assert (args.log_level, args.log_format) == ("info", "logfmt")
    assert (args.action, args.name, args.wait) == ("drain", "gpu1", True)


def test_every_subcommand_takes_the_global_flags() -> None:
    parser = build_parser()
    for path, sub in subcommands(parser):
        flags = {opt for action in sub._actions for opt in action.option_strings}
        assert {"--log-level", "--log-format"} <= flags, path


# --- log lines -----------------------------------------------------------------------------------

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


def _record(name: str, message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_logfmt_lines_have_an_iso_time_with_date_and_offset() -> None:
    line = LogFormatter("logfmt").format(_record("ollamux.proxy", 'listening on "x" now'))
    assert re.fullmatch(
        rf'time={ISO} level=INFO logger=ollamux.proxy msg="listening on \\"x\\" now"', line
    ), line


def test_a_key_value_message_stays_as_it_is() -> None:
    message = 'request_id=abc method=POST path=/api/chat model="a b" status=200 duration=0.081'
    line = LogFormatter("logfmt").format(_record("ollamux.access", message))
    assert line.endswith(f"level=INFO logger=ollamux.access {message}")


def test_json_lines_are_one_object_each() -> None:
    line = LogFormatter("json").format(_record("ollamux.health", "gpu0 is down\nreally", 30))
    entry = json.loads(line)
    assert "\n" not in line
    assert set(entry) == {"time", "level", "logger", "message"}
    assert re.fullmatch(ISO, entry["time"])
    assert (entry["level"], entry["logger"], entry["message"]) == (
        "WARNING",
        "ollamux.health",
        "gpu0 is down\nreally",
    )


def test_under_journald_lines_carry_no_time() -> None:
    stream = StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        setup_logging("info", "logfmt", environ={"JOURNAL_STREAM": "8:1234"}, stream=stream)
        logging.getLogger("ollamux.test").info("hello")
        setup_logging("info", "json", environ={"JOURNAL_STREAM": "8:1234"}, stream=stream)
        logging.getLogger("ollamux.test").info("hello")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    first, second = stream.getvalue().splitlines()
    assert first == "level=INFO logger=ollamux.test msg=hello"
    assert json.loads(second) == {"level": "INFO", "logger": "ollamux.test", "message": "hello"}


def test_every_logger_is_in_the_ollamux_namespace() -> None:
    names = []
    for path in sorted((REPO / "proxy").rglob("*.py")):
        for call in re.findall(r"getLogger\(([^)]*)\)", path.read_text()):
            names.append((path.name, call))
    assert names
    bad = [(f, c) for f, c in names if c and not re.fullmatch(r'"ollamux(\.[a-z_.]+)?"', c)]
    assert bad == []


def test_every_module_name_is_unique_and_none_is_a_stdlib_name() -> None:
    """A reader finds a module from its name alone: `proxy.api.http` vs `proxy.gpu.http` fails, and
    so does a module named like a package (`api/instances.py` beside `instances/`)."""
    seen: dict[str, list[str]] = {}
    for path in sorted((REPO / "proxy").rglob("*.py")):
        if path.name not in ("__init__.py", "__main__.py"):
            seen.setdefault(path.stem, []).append(str(path.relative_to(REPO)))
        elif path.name == "__init__.py" and path.parent != REPO / "proxy":
            seen.setdefault(path.parent.name, []).append(str(path.parent.relative_to(REPO)))
    assert {stem: paths for stem, paths in seen.items() if len(paths) > 1} == {}
    assert sorted(stem for stem in seen if stem in sys.stdlib_module_names) == []


# --- config: duplicate keys, every problem at once -----------------------------------------------


def test_a_duplicate_key_is_an_error_naming_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("listen: 127.0.0.1:11434\nadmin_token: ''\nlisten: 0.0.0.0:11434\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value) == (
        f"{path}: line 3, column 1: not valid YAML: duplicate key 'listen' "
        "(first given at line 1); keep only one"
    )


def test_a_duplicate_key_inside_a_list_item_is_found(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("instances:\n  - name: a\n    gpu: 0\n    name: b\n")
    with pytest.raises(ConfigError, match=r"line 4, column 5: .*duplicate key 'name'"):
        load_config(path)


def test_a_yaml_merge_may_override_keys(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("instances:\n  - <<: {name: a, gpu: 0}\n    name: b\n")
    config = load_config(path)
    assert config.instances != "auto" and config.instances[0].name == "b"


def test_every_independent_problem_is_reported_on_its_own_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "routng: {policy: x}\n"
        "instances:\n"
        "  - {name: a, gpu: 0, port: nope}\n"
        "  - {name: b, gpu: 1, num_paralel: 2}\n"
        "queue: {max_per_model: 0}\n"
    )
    assert main(["config", "check", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"ollamux: error: {path}: routng: unknown key 'routng'; did you mean 'routing'?",
        f"ollamux: error: {path}: instances[0].port: must be an integer, got a string 'nope'",
        f"ollamux: error: {path}: instances[1].num_paralel: unknown key 'num_paralel'; "
        "did you mean 'num_parallel'?",
        f"ollamux: error: {path}: queue.max_per_model: must be >= 1",
    ]
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert len(raised.value.problems) == 4
    assert all(p.source == str(path) for p in raised.value.problems)


# --- --help --------------------------------------------------------------------------------------


def _help(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_every_subcommand_help_has_an_example_the_exit_codes_and_no_bare_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = build_parser()
    for path, sub in [("", parser), *subcommands(parser)]:
        text = _help(*path.split(), capsys=capsys)
        assert path in EXAMPLES, f"no example for `ollamux {path}`"
        assert "example:\n  " in text and "exit codes: 0 success" in text, path
        for action in sub._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"`ollamux {path}`: {action.option_strings or action.dest}"


def test_instances_actions_have_their_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help("instances", "drain", capsys=capsys)
    assert text.startswith("usage: ollamux instances drain ") and "--wait" in text
    assert "{list,drain,undrain,restart}" not in text
    assert "ollamux instances drain gpu1 --wait" in text


def test_systemd_help_texts_say_what_each_flag_does(capsys: pytest.CaptureFixture[str]) -> None:
    uninstall = " ".join(_help("systemd", "uninstall", capsys=capsys).split())
    assert "uninstall from a system image at DIR" in uninstall
    install = " ".join(_help("systemd", "install", capsys=capsys).split())
    assert "install into a system image at DIR" in install
    assert "the proxy's own goes to /etc/ollamux/ollamux.yaml" in install
    assert "write the files here" in _help("systemd", "render", capsys=capsys)
