"""fedgate.compute: Paillier (FATE-compatible) batch arithmetic on CPU, GPU and FPGA, offered as a service.

The backend registry is :data:`K_BACKENDS` (``cpu``, ``gpu``, ``fpga`` by import string, built once in
:mod:`fedgate.compute.api` and re-exported here); :func:`create_backend` imports the selected one only
and raises :class:`~fedgate.errors.UnknownPluginError` for an unknown name. The gRPC service and its
client (:mod:`fedgate.compute.service`, :mod:`fedgate.compute.client`) import grpc and are not imported
here; neither are the gpu, fpga or IFMA modules. See README.md in this directory for the map.
"""

from __future__ import annotations

from fedgate.compute.api import (
    K_BACKENDS,
    BackendFactory,
    BackendStats,
    HeBackend,
    backend_names,
    create_backend,
    resolve_backend_name,
)
from fedgate.compute.config import ComputeConfig
from fedgate.compute.encoding import Encoded, FixedPointCoder
from fedgate.compute.limbs import LimbBuffer, from_limbs, limbs_for_bits, to_limbs
from fedgate.compute.paillier import PublicKey, SecretKey, generate_keypair

__all__ = [
    "K_BACKENDS",
    "BackendFactory",
    "BackendStats",
    "ComputeConfig",
    "Encoded",
    "FixedPointCoder",
    "HeBackend",
    "LimbBuffer",
    "PublicKey",
    "SecretKey",
    "backend_names",
    "create_backend",
    "from_limbs",
    "generate_keypair",
    "limbs_for_bits",
    "resolve_backend_name",
    "to_limbs",
]
