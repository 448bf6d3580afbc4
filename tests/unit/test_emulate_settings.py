"""`ollamux emulate` settings: flag, then config instance, then OLLAMA_*, then Ollama's default."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from proxy.emulator.launch import EmulateOptions, parse_gpu, plan_emulator
from proxy.errors import ConfigError

CONFIG = """
models_dir: {models}
emulator:
  speed: 5
  version: 0.9.9
  seed: 7
  spread_penalty: 0.1
  gpus:
    - {{name: small, memory_gib: 24}}
    - {{name: big, memory_gib: 48, speed: 0.85}}
  models:
    - {{name: "tiny:1b", size_gb: 1}}
instances:
  - {{name: gpu0, launcher: emulated, gpu: small, port: 11500, num_parallel: 3, keep_alive: 10m,
      context_length: 8192}}
  - {{name: box, launcher: emulated, gpu: [small, big], port: 11501, spread: true}}
  - {{name: real, launcher: process, gpu: 5}}
"""


@pytest.fixture
def config_file(tmp_path: Path) -> str:
    path = tmp_path / "box.yaml"
    path.write_text(CONFIG.format(models=tmp_path / "models"), encoding="utf-8")
    return str(path)


def test_standalone_defaults_are_ollamas() -> None:
    plan = plan_emulator(EmulateOptions(gpus=("rtx4090:24",)), {})
    s = plan.settings
    assert (plan.host, plan.port) == ("127.0.0.1", 11434)
    assert [(g.name, g.memory_gib, g.speed) for g in s.gpus] == [("rtx4090", 24.0, 1.0)]
    assert s.num_parallel == 1
    assert s.keep_alive == 300.0
    assert s.max_loaded_models == 0
    assert s.max_queue == 512
    assert s.context_length == 0
    assert s.spread is False
    assert s.origins == ()
    assert plan.speed == 1.0
    assert plan.models == ()
    assert plan.models_dir is None


def test_environment_is_read_like_ollama() -> None:
    env = {
        "OLLAMA_NUM_PARALLEL": "3",
        "OLLAMA_KEEP_ALIVE": "-1",
        "OLLAMA_MAX_LOADED_MODELS": "2",
        "OLLAMA_MAX_QUEUE": "9",
        "OLLAMA_CONTEXT_LENGTH": '"4096"',
        "OLLAMA_SCHED_SPREAD": "yes",  # anything ParseBool rejects counts as true
        "OLLAMA_ORIGINS": "http://a.example, app://*",
    }
    s = plan_emulator(EmulateOptions(gpus=("a:24", "b:24")), env).settings
    assert s.num_parallel == 3
    assert math.isinf(s.keep_alive)
    assert s.max_loaded_models == 2
    assert s.max_queue == 9
    assert s.context_length == 4096
    assert s.spread is True
    assert s.origins == ("http://a.example", "app://*")


def test_invalid_environment_values_fall_back_to_defaults() -> None:
    env = {"OLLAMA_NUM_PARALLEL": "many", "OLLAMA_KEEP_ALIVE": "soon", "OLLAMA_SCHED_SPREAD": "0"}
    s = plan_emulator(EmulateOptions(gpus=("a:24",)), env).settings
    assert (s.num_parallel, s.keep_alive, s.spread) == (1, 300.0, False)


def test_flags_override_environment() -> None:
    options = EmulateOptions(
        gpus=("a:24",), num_parallel=2, keep_alive="30s", spread=False, listen="127.0.0.1:9999"
    )
    env = {"OLLAMA_NUM_PARALLEL": "8", "OLLAMA_KEEP_ALIVE": "1h", "OLLAMA_SCHED_SPREAD": "1"}
    plan = plan_emulator(options, env)
    assert (plan.settings.num_parallel, plan.settings.keep_alive) == (2, 30.0)
    assert plan.settings.spread is False
    assert plan.port == 9999


def test_config_instance_gives_gpus_and_settings(config_file: str) -> None:
    env = {"OLLAMA_NUM_PARALLEL": "8"}  # the config instance wins over the environment
    plan = plan_emulator(EmulateOptions(config=config_file, instance="gpu0"), env)
    s = plan.settings
    assert (plan.host, plan.port) == ("127.0.0.1", 11500)
    assert [g.name for g in s.gpus] == ["small"]
    assert (s.num_parallel, s.keep_alive, s.context_length) == (3, 600.0, 8192)
    assert s.spread_penalty == 0.1
    assert plan.speed == 5
    assert plan.version == "0.9.9"
    assert plan.seed == 7
    assert [m.name for m in plan.models] == ["tiny:1b"]
    assert plan.models_dir == Path(config_file).parent / "models"


def test_spread_instance_gets_all_its_gpus(config_file: str) -> None:
    plan = plan_emulator(EmulateOptions(config=config_file, instance="box"), {})
    assert [g.name for g in plan.settings.gpus] == ["small", "big"]
    assert plan.settings.spread is True
    assert plan.settings.num_parallel == 4  # ollamux's instance default, not Ollama's 1


def test_flags_override_the_config_instance(config_file: str) -> None:
    options = EmulateOptions(
        config=config_file,
        instance="gpu0",
        gpus=("other:80",),
        num_parallel=1,
        speed=50,
        seed=1,
        models_dir="/elsewhere",
        listen="127.0.0.1:12000",
    )
    plan = plan_emulator(options, {})
    assert [g.name for g in plan.settings.gpus] == ["other"]
    assert plan.settings.num_parallel == 1
    assert plan.settings.context_length == 8192
    assert (plan.speed, plan.seed, plan.port) == (50, 1, 12000)
    assert plan.models_dir == Path("/elsewhere")


@pytest.mark.parametrize(
    ("options", "where", "fix"),
    [
        (EmulateOptions(), "--gpu", "use --gpu NAME:GIB"),
        (EmulateOptions(gpus=("big",)), "--gpu", "use e.g. rtx4090:24"),
        (EmulateOptions(gpus=("a:-1",)), "--gpu", "must be > 0"),
        (EmulateOptions(gpus=("a:24", "a:48")), "--gpu", "must differ"),
        (EmulateOptions(gpus=("a:24",), num_parallel=0), "--num-parallel", "must be >= 1"),
        (EmulateOptions(gpus=("a:24",), keep_alive="later"), "--keep-alive", "use e.g. 5m"),
        (EmulateOptions(gpus=("a:24",), listen="nowhere"), "--listen", "HOST:PORT"),
        (EmulateOptions(gpus=("a:24",), speed=0), "--speed", "must be > 0"),
        (EmulateOptions(gpus=("a:24",), instance="x"), "--instance", "needs --config"),
    ],
)
def test_bad_flags_name_the_flag(options: EmulateOptions, where: str, fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        plan_emulator(options, {})
    assert str(info.value).startswith(f"{where}: ")
    assert fix in str(info.value)


@pytest.mark.parametrize(
    ("instance", "fix"),
    [
        (None, "has 2 emulated instances; pick one with --instance (gpu0, box)"),
        ("real", "'real' in "),
        ("nope", "no emulated instance 'nope'"),
    ],
)
def test_instance_lookup_errors(config_file: str, instance: str | None, fix: str) -> None:
    with pytest.raises(ConfigError, match="--instance") as info:
        plan_emulator(EmulateOptions(config=config_file, instance=instance), {})
    assert fix in str(info.value)


def test_parse_gpu_with_speed() -> None:
    gpu = parse_gpu("l40s:48:0.85")
    assert (gpu.name, gpu.memory_gib, gpu.speed) == ("l40s", 48.0, 0.85)


def test_describe_names_address_gpus_and_settings() -> None:
    options = EmulateOptions(gpus=("a:24", "b:48"), listen="127.0.0.1:5000", keep_alive="-1")
    line = plan_emulator(options, {}).describe()
    assert "http://127.0.0.1:5000" in line
    assert "a (24.0 GiB, speed 1)" in line
    assert "b (48.0 GiB" in line
    assert "keep_alive=forever" in line
    assert "max_loaded_models=auto (6)" in line
    assert "\n" not in line
