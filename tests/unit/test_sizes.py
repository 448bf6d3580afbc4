"""Sizes in the config (``limits.max_body``): byte counts, or numbers with binary or SI units."""

from __future__ import annotations

import pytest

from proxy.config import LimitsConfig, config_from_dict
from proxy.errors import ConfigError
from proxy.units import SizeError, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (1048576, 1048576),
        ("1048576", 1048576),
        ("64MiB", 64 * 1024**2),
        ("64mib", 64 * 1024**2),
        ("1GiB", 1024**3),
        ("1.5 GiB", 3 * 1024**3 // 2),
        ("500MB", 500_000_000),
        ("2KiB", 2048),
        ("0", 0),
    ],
)
def test_sizes_parse(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["-1", "lots", "64 XiB", "", "1e9", True, None, [1]])
def test_bad_sizes_are_refused(text: object) -> None:
    with pytest.raises(SizeError):
        parse_size(text)


def test_limits_in_the_config() -> None:
    assert config_from_dict({}).limits == LimitsConfig(max_body=64 * 1024**2, client_idle=30.0)
    limits = config_from_dict({"limits": {"max_body": "1GiB", "client_idle": "10s"}}).limits
    assert limits.max_body == 1024**3 and limits.client_idle == 10.0
    with pytest.raises(ConfigError, match=r"^c.yaml: limits.max_body: not a size: 'lots'; use e"):
        config_from_dict({"limits": {"max_body": "lots"}}, source="c.yaml")
    with pytest.raises(ConfigError, match=r"limits.max_body: must be at least 1KiB"):
        config_from_dict({"limits": {"max_body": 100}})
    with pytest.raises(ConfigError, match=r"limits.client_idle: must be > 0"):
        config_from_dict({"limits": {"client_idle": 0}})
