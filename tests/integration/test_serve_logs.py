"""`ollamux serve --log-format json`: every stderr line is one JSON object, the instances' too."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.test_backends_flag import start, stop, wait_answering
from tests.processes import free_ports


def test_json_logs_carry_the_instances_lines_as_json(tmp_path: Path) -> None:
    listen, port = free_ports(2)
    config = tmp_path / "box.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{listen}\n"
        "emulator: {speed: 20, gpus: [{name: a, memory_gib: 24}]}\n"
        f"instances: [{{name: gpu0, launcher: emulated, gpu: 0, port: {port}}}]\n"
    )
    proc, log = start("--log-format", "json", "serve", "--config", str(config), logs=tmp_path)
    wait_answering(f"http://127.0.0.1:{listen}/", proc, log)
    stop(proc, log)
    entries = [json.loads(line) for line in log.read_text().splitlines()]  # every line is JSON
    mine = [e for e in entries if e.get("instance") == "gpu0"]
    assert any(e["logger"].startswith("ollamux.emulator") for e in mine), entries
    assert all({"level", "logger", "message"} <= set(e) for e in entries)
    assert any(e["logger"] == "ollamux.proxy" for e in entries)
