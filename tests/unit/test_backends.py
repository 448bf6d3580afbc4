"""`serve --backend`: the config built from the flags, its names, its errors and its warning."""

from __future__ import annotations

import pytest

from proxy.errors import ConfigError
from proxy.instances.backends import backend_names, backends_config, serve_config


def test_names_come_from_host_and_port_and_fit_a_drain_url() -> None:
    urls = [
        "http://10.0.0.5:11434",
        "http://10.0.0.5:11434/other/",
        "https://gpu-box",
        "http://[::1]:11434",
    ]
    names = backend_names(urls)
    assert names == ["10.0.0.5-11434", "10.0.0.5-11434-2", "gpu-box", "__1-11434"]
    assert all(set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789._-") for name in names)


def test_each_backend_is_an_external_instance() -> None:
    config = backends_config(["http://10.0.0.5:11434", "http://10.0.0.6:11434"], num_parallel=2)
    assert config.source == "--backend"
    assert config.instances != "auto"
    assert [(i.name, i.launcher, i.url, i.slots) for i in config.instances] == [
        ("10.0.0.5-11434", "external", "http://10.0.0.5:11434", 2),
        ("10.0.0.6-11434", "external", "http://10.0.0.6:11434", 2),
    ]
    assert config.warnings == ()


def test_without_num_parallel_one_warning_names_the_flag() -> None:
    config = backends_config(["http://10.0.0.5:11434", "http://10.0.0.6:11434"])
    assert config.instances != "auto"
    assert [i.slots for i in config.instances] == [1, 1]
    (warning,) = config.warnings
    assert warning.startswith("--num-parallel: not given; ollamux assumes each --backend serves 1")


def test_every_bad_flag_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        backends_config(["gpu-box:11434", "http://a:1", "http://a:1/"], num_parallel=0)
    assert [str(p) for p in info.value.problems] == [
        "--backend: 'gpu-box:11434' needs http:// or https:// in front, "
        "e.g. --backend http://10.0.0.5:11434",
        "--backend: http://a:1/ is given twice; name each server once",
        "--num-parallel: must be >= 1: the servers' OLLAMA_NUM_PARALLEL, e.g. --num-parallel 2",
    ]


def test_backend_and_config_do_not_go_together() -> None:
    with pytest.raises(ConfigError, match=r"^--backend: cannot be used with --config"):
        serve_config("x.yaml", ["http://a:1"], None)
    with pytest.raises(ConfigError, match=r"^--num-parallel: applies to the --backend servers"):
        serve_config(None, [], 2)
    assert serve_config(None, [], None).instances == "auto"
