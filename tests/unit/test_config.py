"""Config loading: defaults, auto ports, every error naming file, field path and a fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import (
    Config,
    InstanceConfig,
    config_from_dict,
    emulated_gpus,
    load_config,
    parse_listen,
)
from proxy.config_dump import dump_config
from proxy.emulator.catalogue import DEFAULT_MODELS
from proxy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted((REPO / "config").glob("*.yaml"))

GPUS = [{"name": "a", "memory_gib": 24}, {"name": "b", "memory_gib": 48, "speed": 0.85}]


def emulated(**instance: Any) -> dict[str, Any]:
    """A config dict with two emulated GPUs and the given instances (each a dict)."""
    return {"emulator": {"gpus": GPUS}, "instances": list(instance.values())}


@pytest.fixture
def write(tmp_path: Path) -> Any:
    def write(text: str, name: str = "ollamux.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


# --- defaults and resolution ---------------------------------------------------------------------


def test_empty_file_gives_the_defaults(write: Any) -> None:
    config = load_config(write(""))
    assert config.listen == "127.0.0.1:11434"
    assert config.instances == "auto"
    assert config.routing.policy == "vram_queue"
    assert config.queue.timeout == 300.0
    assert config.timeouts.start == 60.0
    assert config.emulator.models == ()
    assert config.source.endswith("ollamux.yaml")


def test_instance_defaults() -> None:
    config = config_from_dict({"instances": [{"name": "gpu0", "gpu": 0}]})
    assert config.instances != "auto"
    (inst,) = config.instances
    assert inst.launcher == "process"
    assert inst.gpu == (0,)
    assert (inst.num_parallel, inst.slots) == (0, 4)  # 0: ollamux's default, 4
    assert inst.keep_alive == "5m"
    assert inst.max_queue == 512
    assert inst.port == 11435


def test_ports_are_assigned_from_11435_skipping_taken_and_listen_ports() -> None:
    raw = {
        "listen": "127.0.0.1:11436",
        "instances": [
            {"name": "a", "gpu": 0},
            {"name": "b", "gpu": 1, "port": 11437},
            {"name": "c", "gpu": 2},
            {"name": "d", "gpu": 3},
        ],
    }
    config = config_from_dict(raw)
    assert config.instances != "auto"
    assert [i.port for i in config.instances] == [11435, 11437, 11438, 11439]


def test_durations_accept_numbers_and_go_strings() -> None:
    config = config_from_dict(
        {"timeouts": {"start": "1m30s", "connect": 3}, "queue": {"timeout": -1}}
    )
    assert config.timeouts.start == 90.0
    assert config.timeouts.connect == 3.0
    assert config.queue.timeout == float("inf")


def test_scalar_gpu_is_a_list_of_one_and_emulated_gpus_resolve_by_name_or_index() -> None:
    config = config_from_dict(
        emulated(
            x={"name": "x", "launcher": "emulated", "gpu": "b"},
            y={"name": "y", "launcher": "emulated", "gpu": 0},
        )
    )
    assert config.instances != "auto"
    x, y = config.instances
    assert [g.name for g in emulated_gpus(config, x)] == ["b"]
    assert [g.name for g in emulated_gpus(config, y)] == ["a"]
    assert emulated_gpus(config, x)[0].speed == 0.85
    assert emulated_gpus(config, y)[0].uuid.startswith("GPU-")


def test_spread_instance_over_several_emulated_gpus() -> None:
    inst = {"name": "box", "launcher": "emulated", "gpu": ["a", "b"], "spread": True}
    config = config_from_dict(emulated(box=inst))
    assert config.instances != "auto"
    assert [g.name for g in emulated_gpus(config, config.instances[0])] == ["a", "b"]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.instances != "auto"
    assert len(config.instances) == 4


def test_shipped_configs_exist() -> None:
    assert {p.name for p in CONFIG_FILES} >= {"demo.yaml", "example.yaml"}


def test_demo_is_a_mixed_box_of_four_emulated_gpus() -> None:
    config = load_config(REPO / "config" / "demo.yaml")
    assert config.instances != "auto"
    assert [g.memory_gib for g in config.emulator.gpus] == [24, 24, 48, 48]
    assert [i.port for i in config.instances] == [11435, 11436, 11437, 11438]
    assert {i.launcher for i in config.instances} == {"emulated"}
    assert parse_listen(config.listen) == ("127.0.0.1", 11434)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_the_resolved_dump_loads_back_into_the_same_config(path: Path) -> None:
    config = load_config(path)
    text = dump_config(config)
    again = config_from_dict(yaml.safe_load(text), source=config.source)
    expected = config
    if not config.emulator.models:
        emulator = dataclasses.replace(config.emulator, models=DEFAULT_MODELS)
        expected = dataclasses.replace(config, emulator=emulator)
    assert again == expected


def test_the_dump_spells_out_the_builtin_catalogue() -> None:
    tree = yaml.safe_load(dump_config(Config()))
    assert [m["name"] for m in tree["emulator"]["models"]] == [m.name for m in DEFAULT_MODELS]
    assert tree["instances"] == "auto"
    assert "source" not in tree


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert parse_listen(":11434") == ("127.0.0.1", 11434)
    assert parse_listen("[::1]:11434") == ("::1", 11434)
    for bad in ("localhost", "host:0", "host:port", "host:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad)


# --- errors: file, field path, what is wrong, how to fix ------------------------------------------

BAD_CONFIGS = {
    "unknown key with suggestion": (
        "instances:\n  - {name: gpu0, gpu: 0, num_paralel: 2}\n",
        "instances[0].num_paralel",
        "did you mean 'num_parallel'?",
    ),
    "unknown top-level key": ("lsiten: 127.0.0.1:1\n", "lsiten", "did you mean 'listen'?"),
    "wrong type": (
        "instances:\n  - {name: gpu0, gpu: 0, num_parallel: four}\n",
        "instances[0].num_parallel",
        "must be an integer, got a string 'four'",
    ),
    "wrong section type": ("routing: vram_queue\n", "routing", "must be a mapping, got a string"),
    "bad policy": (
        "routing: {policy: fastest}\n",
        "routing.policy",
        "'fastest' is not one of 'vram_queue'",
    ),
    "duplicate port": (
        "instances:\n  - {name: a, gpu: 0, port: 11500}\n  - {name: b, gpu: 1, port: 11500}\n",
        "instances[1].port",
        "port 11500 is already used by instances[0]; give each instance its own port",
    ),
    "instance on the proxy's port": (
        "instances:\n  - {name: a, gpu: 0, port: 11434}\n",
        "instances[0].port",
        "the proxy's own listen port",
    ),
    "duplicate GPU": (
        "instances:\n  - {name: a, gpu: 0}\n  - {name: b, gpu: 0}\n",
        "instances[1].gpu",
        "GPU 0 is already owned by instances[0]; each GPU belongs to one instance",
    ),
    "duplicate emulated GPU by name and index": (
        "emulator: {gpus: [{name: a, memory_gib: 24}]}\n"
        "instances:\n  - {name: x, launcher: emulated, gpu: a}\n"
        "  - {name: y, launcher: emulated, gpu: 0}\n",
        "instances[1].gpu",
        "already owned by instances[0]",
    ),
    "duplicate name": (
        "instances:\n  - {name: a, gpu: 0}\n  - {name: a, gpu: 1}\n",
        "instances[1].name",
        "'a' is already used by instances[0]; each name must be unique",
    ),
    "emulated GPU that does not exist": (
        "emulator: {gpus: [{name: a, memory_gib: 24}]}\n"
        "instances:\n  - {name: x, launcher: emulated, gpu: h100}\n",
        "instances[0].gpu",
        "'h100' is not an emulated GPU; use one of ['a'] or its index",
    ),
    "emulated GPU index out of range": (
        "emulator: {gpus: [{name: a, memory_gib: 24}]}\n"
        "instances:\n  - {name: x, launcher: emulated, gpu: [0, 3], spread: true}\n",
        "instances[0].gpu[1]",
        "3 is not an emulated GPU",
    ),
    "emulated without GPUs": (
        "instances:\n  - {name: x, launcher: emulated, gpu: 0}\n",
        "instances[0].launcher",
        "add an emulator.gpus list",
    ),
    "bad duration": (
        "timeouts: {start: 5x}\n",
        "timeouts.start",
        'unknown unit "x" in duration "5x"; use e.g. 30s, 5m or 1h',
    ),
    "bad keep_alive": (
        "instances:\n  - {name: a, gpu: 0, keep_alive: 5 minutes}\n",
        "instances[0].keep_alive",
        "use e.g. 5m, 1h or -1 (forever)",
    ),
    "value out of range": (
        "instances:\n  - {name: a, gpu: 0, num_parallel: -1}\n",
        "instances[0].num_parallel",
        "must be >= 1",
    ),
    "external without url": (
        "instances:\n  - {name: a, launcher: external}\n",
        "instances[0].url",
        "is required for launcher external",
    ),
    "bad listen": ("listen: localhost\n", "listen", "use e.g. 127.0.0.1:11434"),
    "missing required key": (
        "emulator: {gpus: [{name: a}]}\n",
        "emulator.gpus[0].memory_gib",
        "is required",
    ),
    "bad YAML": ("instances:\n  - {name: a\n  gpu: 0\n", "line ", "not valid YAML"),
    "not a mapping": ("- a\n- b\n", "(top level)", "must be a mapping, got a list"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS), ids=str)
def test_errors_name_the_file_the_field_and_the_fix(write: Any, case: str) -> None:
    text, path, fix = BAD_CONFIGS[case]
    file = write(text)
    with pytest.raises(ConfigError) as info:
        load_config(file)
    message = str(info.value)
    assert message.startswith(f"{file}: {path}"), message
    assert fix in message
    assert "\n" not in message
    assert info.value.source == str(file)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read the file \(No such file"):
        load_config(tmp_path / "nope.yaml")


def test_source_is_not_a_yaml_key() -> None:
    with pytest.raises(ConfigError, match="unknown key 'source'"):
        config_from_dict({"source": "x"})


def test_an_instance_listing_a_gpu_twice_says_so() -> None:
    with pytest.raises(ConfigError, match=r"instances\[0\]\.gpu: GPU 1 is listed twice"):
        config_from_dict({"instances": [{"name": "a", "gpu": [1, 1]}]})


def test_instance_config_validates_on_its_own() -> None:
    with pytest.raises(ConfigError, match="port: must be a TCP port"):
        InstanceConfig(name="a", port=70000)


def test_a_retired_key_names_what_replaced_it() -> None:
    with pytest.raises(
        ConfigError, match=r"timeouts\.first_byte: is no longer a setting: use load"
    ):
        config_from_dict({"timeouts": {"first_byte": "5m"}}, source="x.yaml")


# --- external instances: settings that do nothing, URLs, num_parallel (issue 14) ------------------

SET_LAUNCHED_ONLY: dict[str, Any] = {
    "port": 11500,
    "keep_alive": "10m",
    "max_loaded_models": 2,
    "max_queue": 10,
    "context_length": 4096,
    "spread": True,
    "env": {"OLLAMA_DEBUG": "1"},
}
SET_EXTERNAL_ONLY: dict[str, Any] = {
    "url": "http://10.0.0.5:11434",
    "gpu_source": "http://10.0.0.5:11433",
    "gpu_source_token": "secret",
    "memory_gib": 24,
    "store": "nfs",
    "api_key": "secret-key-of-the-node",
}
EXTERNAL = {"name": "remote", "launcher": "external", "url": "http://10.0.0.5:11434"}


def test_the_tables_below_cover_every_launcher_only_setting() -> None:
    assert sorted(SET_LAUNCHED_ONLY) == sorted(InstanceConfig.LAUNCHED_ONLY)
    assert sorted(SET_EXTERNAL_ONLY) == sorted(InstanceConfig.EXTERNAL_ONLY)


@pytest.mark.parametrize("key", list(SET_LAUNCHED_ONLY))
def test_a_launched_only_setting_is_rejected_for_external(key: str) -> None:
    inst = {**EXTERNAL, key: SET_LAUNCHED_ONLY[key]}
    with pytest.raises(ConfigError) as info:
        config_from_dict({"instances": [inst]}, source="x.yaml")
    message = str(info.value)
    assert message.startswith(f"x.yaml: instances[0].{key}: does nothing for launcher external")
    assert "set it where the server runs" in message


@pytest.mark.parametrize("key", [k for k in SET_EXTERNAL_ONLY if k != "gpu_source_token"])
def test_an_external_only_setting_is_rejected_for_process(key: str) -> None:
    inst = {"name": "gpu0", "gpu": 0, key: SET_EXTERNAL_ONLY[key]}
    with pytest.raises(ConfigError) as info:
        config_from_dict({"instances": [inst]}, source="x.yaml")
    assert str(info.value) == (
        f"x.yaml: instances[0].{key}: is only for launcher external, not process"
    )


def test_gpu_source_token_is_rejected_for_process() -> None:
    inst = {"name": "gpu0", "gpu": 0, "gpu_source_token": "secret"}
    with pytest.raises(ConfigError, match=r"instances\[0\]\.gpu_source_token: is only for"):
        config_from_dict({"instances": [inst]})


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("10.0.0.5:11434", "'10.0.0.5:11434' needs http:// or https:// in front"),
        ("ftp://10.0.0.5:11434", "needs http:// or https:// in front"),
        ("http://", "'http://' names no host"),
        ("http://10.0.0.5:11434/?keep=1", "without ?query"),
        ("http://10.0.0.5:99999", "is not a URL"),
    ],
)
def test_an_external_url_is_validated(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"instances": [{**EXTERNAL, "url": url}]}, source="x.yaml")
    message = str(info.value)
    assert message.startswith("x.yaml: instances[0].url: "), message
    assert says in message and "e.g. http://10.0.0.5:11434" in message


def test_gpu_source_is_validated_like_url() -> None:
    inst = {**EXTERNAL, "gpu_source": "10.0.0.5:11433"}
    with pytest.raises(ConfigError, match=r"instances\[0\]\.gpu_source: .*needs http://"):
        config_from_dict({"instances": [inst]})


def test_good_external_urls_pass() -> None:
    for url in ("http://10.0.0.5:11434", "https://gpu-box/ollama/", "http://[::1]:11434"):
        config_from_dict({"instances": [{**EXTERNAL, "url": url}]})


def test_gpu_of_an_external_instance_needs_gpu_source() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"instances": [{**EXTERNAL, "gpu": 0}]}, source="x.yaml")
    assert str(info.value).startswith("x.yaml: instances[0].gpu: picks GPUs among those of")
    assert "set gpu_source" in str(info.value)
    with_source = {**EXTERNAL, "gpu": 0, "gpu_source": "http://10.0.0.5:11433"}
    config_from_dict({"instances": [with_source]})  # picks the agent's GPU 0


def test_an_external_instance_without_num_parallel_warns_and_assumes_1() -> None:
    config = config_from_dict({"instances": [EXTERNAL, {"name": "gpu0", "gpu": 0}]})
    assert config.instances != "auto"
    assert [inst.slots for inst in config.instances] == [1, 4]
    (warning,) = config.warnings  # the launched one is not warned about: ollamux sets it
    assert warning.startswith("instances[0].num_parallel: not set for external instance remote")
    assert "OLLAMA_NUM_PARALLEL" in warning


def test_an_external_instance_with_num_parallel_does_not_warn() -> None:
    config = config_from_dict({"instances": [{**EXTERNAL, "num_parallel": 2}]})
    assert config.instances != "auto"
    assert config.instances[0].slots == 2
    assert config.warnings == ()


def test_config_check_of_an_external_instance(write: Any) -> None:
    full = {**EXTERNAL, "gpu_source": "http://10.0.0.5:11433", "memory_gib": 24, "store": "nfs"}
    other = {**EXTERNAL, "name": "b", "url": "http://b:1"}
    path = write(yaml.safe_dump({"instances": [full, other]}))
    config = load_config(path)
    text = dump_config(config)
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header[0] == f"# {path}, resolved by ollamux config check"
    assert header[1].startswith("# warning: instances[0].num_parallel: not set")
    assert header[2].startswith("# warning: instances[1].num_parallel: not set")
    tree = yaml.safe_load(text)
    for inst in tree["instances"]:
        assert not set(inst) & set(InstanceConfig.LAUNCHED_ONLY), inst
    assert tree["instances"][0]["gpu_source"] == "http://10.0.0.5:11433"
    assert tree["instances"][0]["store"] == "nfs"
    again = config_from_dict(tree, source=config.source)  # the dump loads back as it was
    emulator = dataclasses.replace(config.emulator, models=DEFAULT_MODELS)
    assert again == dataclasses.replace(config, emulator=emulator)


def test_config_check_of_a_launched_instance_shows_no_external_keys() -> None:
    tree = yaml.safe_load(dump_config(config_from_dict({"instances": [{"name": "g", "gpu": 0}]})))
    assert not set(tree["instances"][0]) & set(InstanceConfig.EXTERNAL_ONLY)
    assert tree["instances"][0]["port"] == 11435


def test_an_api_key_is_one_word_and_only_for_servers_ollamux_does_not_start() -> None:
    node = {"name": "n", "launcher": "node", "url": "http://box2:11434", "api_key": "k1"}
    (inst,) = config_from_dict({"instances": [node]}).instances  # type: ignore[misc]
    assert inst.api_key == "k1"
    with pytest.raises(ConfigError, match=r"instances\[0\].api_key: must be one word"):
        config_from_dict({"instances": [{**node, "api_key": "two words"}]})
    with pytest.raises(ConfigError, match=r"instances\[0\].api_key: is only for launcher"):
        config_from_dict({"instances": [{"name": "g", "gpu": 0, "api_key": "k1"}]})
