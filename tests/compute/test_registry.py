"""Backend registry and the [compute] config section."""

from __future__ import annotations

import pytest

from fedgate.compute.api import K_BACKENDS, backend_names, create_backend, resolve_backend_name
from fedgate.compute.config import ComputeConfig
from fedgate.compute.cpu import CpuBackend
from fedgate.configtree import build
from fedgate.errors import ConfigError, UnknownPluginError


def test_unknown_backend_lists_valid_names() -> None:
    with pytest.raises(UnknownPluginError) as info:
        resolve_backend_name("tpu")
    assert info.value.valid == ["auto", "cpu", "fpga", "gpu"]
    assert "compute.backend" in str(info.value)


def test_config_rejects_unknown_backend_and_keys() -> None:
    with pytest.raises(ConfigError, match=r"compute\.backend"):
        build(ComputeConfig, {"backend": "tpu"}, path="compute")
    with pytest.raises(ConfigError, match="unknown key"):
        build(ComputeConfig, {"bakend": "cpu"}, path="compute")
    with pytest.raises(ConfigError, match="key_bits"):
        build(ComputeConfig, {"key_bits": 512}, path="compute")
    cfg = build(ComputeConfig, {"backend": "cpu", "key_bits": 1024, "workers": 2}, path="compute")
    assert cfg.key_bits == 1024 and cfg.short_exponent


def test_defaults() -> None:
    cfg = ComputeConfig()
    assert cfg.key_bits == 2048 and cfg.backend == "auto" and cfg.short_exponent


def test_create_cpu_and_auto_without_gpu() -> None:
    backend = create_backend(ComputeConfig(workers=1), "cpu")
    assert isinstance(backend, CpuBackend)
    backend.close()
    try:
        import cupy  # noqa: F401
    except ImportError:
        auto = create_backend(ComputeConfig(workers=1))
        assert auto.name == "cpu"
        auto.close()


def test_registry_names() -> None:
    assert set(K_BACKENDS) == {"cpu", "gpu", "fpga"}
    assert backend_names() == ["auto", "cpu", "fpga", "gpu"]
