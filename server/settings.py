"""Server settings, declared in one place.

Every field reads from an environment variable ``SCALESWAP_<FIELD>`` (e.g. ``SCALESWAP_ADMIN_KEY``,
``SCALESWAP_PORT``); the ``scaleswap serve`` flags of the same name override the environment.
Validation happens at construction and raises ``ValueError`` naming the valid choices.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCALESWAP_", extra="ignore")

    # -- the model ----------------------------------------------------------------------------
    model: str | None = Field(
        None, description="Quantized base dir, HF model dir or GGUF file; none: the default model (SmolLM2-135M)"
    )
    bits: int = Field(4, description="bits when --model must be quantized first (2, 3, 4, 8)")
    group_size: int = Field(64, description="group size when --model must be quantized first (-1 = per channel)")
    served_model_name: str | None = Field(
        None, description="`model` id of the base in the API (default: the model directory's name)"
    )

    # -- network ------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    # -- state and auth -----------------------------------------------------------------------
    data_dir: Path = Field(Path("scaleswap-data"), description="tenant store: SQLite metadata + scale blobs")
    admin_key: SecretStr | None = Field(None, description="Bearer key for tenant management; none: open on loopback")

    # -- engine -------------------------------------------------------------------------------
    device: str = Field("auto", description="engine device: auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    max_waiting: int = Field(256, ge=1, description="waiting-queue bound; beyond it requests get 429")
    max_num_seqs: int | None = Field(None, ge=1, description="sequences decoded together (engine default if unset)")
    max_model_len: int | None = Field(None, ge=16, description="context length (engine default if unset)")
    max_resident_tenants: int | None = Field(None, ge=1, description="scale-bank slots (engine default if unset)")
    max_concurrent_per_tenant: int | None = Field(None, ge=1, description="requests in flight per tenant")
    precision: str = Field("fast", description="CPU arithmetic: fast (bf16 int4 matmuls and int8 LM head for small "
                                               "batches) or fp32 (float32 throughout: batch-independent results)")

    # -- limits and behaviour -----------------------------------------------------------------
    max_upload_mb: float = Field(256.0, gt=0, description="largest scale-set upload, MiB (413 beyond)")
    shutdown_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, drain in-flight requests this long")
    metrics_max_tenant_labels: int = Field(
        32, ge=0, description="tenants that get their own metrics label (first seen); the rest are 'other'"
    )
    log_level: str = "info"

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, v: str) -> str:
        choices = ("critical", "error", "warning", "info", "debug", "trace")
        if v.lower() not in choices:
            raise ValueError(f"log level must be one of {', '.join(choices)}, got {v!r}")
        return v.lower()

    @field_validator("precision")
    @classmethod
    def _check_precision(cls, v: str) -> str:
        if v not in ("fast", "fp32"):
            raise ValueError(f"precision must be fast or fp32, got {v!r}")
        return v

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, v: int) -> int:
        if v not in (2, 3, 4, 8):
            raise ValueError(f"bits must be one of 2, 3, 4, 8, got {v}")
        return v

    @field_validator("admin_key")
    @classmethod
    def _check_admin_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or not v.get_secret_value():
            return None  # empty env var = no key
        if len(v.get_secret_value()) < 8:
            raise ValueError("admin key must have at least 8 characters")
        return v

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def auth_enabled(self) -> bool:
        return self.admin_key is not None

    def check_exposure(self) -> None:
        """Refuse to listen beyond loopback with no admin key (anyone could manage tenants)."""
        if not self.auth_enabled and not is_loopback(self.host):
            raise ValueError(
                f"refusing to listen on {self.host} without an admin key: with no key configured the API is open, "
                f"so it binds to 127.0.0.1 only; set --admin-key or SCALESWAP_ADMIN_KEY to listen on {self.host}"
            )
