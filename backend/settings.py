"""PIESCOPE_* settings: one object, built once and passed down (no module globals)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _home() -> Path:
    """Where models_cache/ and data/ live by default: the checkout when running from one, else
    the working directory (an installed package must never write into site-packages)."""
    return _REPO_ROOT if (_REPO_ROOT / "pyproject.toml").is_file() else Path.cwd()


class Settings(BaseSettings):
    """Defaults give a working local setup with no configuration at all."""

    model_config = SettingsConfigDict(env_prefix="PIESCOPE_", env_file=".env", extra="ignore")

    models_cache: Path = Field(default_factory=lambda: _home() / "models_cache",
                               description="converted models, trained transcoders, activations")
    data_dir: Path = Field(default_factory=lambda: _home() / "data", description="database and job artefacts")
    db_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite in data_dir if unset")
    device: str = Field(default="cpu", description="torch device for models and transcoders")
    dtype: str = Field(default="float32", description="model dtype: float32, bfloat16 or float16")
    hf_cache: Path | None = Field(default=None, description="a local Hugging Face hub cache to read from")

    executor: Literal["inprocess", "ray"] = Field(
        default="inprocess", description="where sweeps run: in this process, or as shards on Ray actors")
    ray_address: str | None = Field(default=None, description="the Ray cluster to join ('auto': the one "
                                    "`ray start` runs here); unset: start a local Ray instance")
    ray_workers: int | None = Field(default=None, ge=1, description="Ray actors per sweep, each holding the "
                                    "model once; unset: one per GPU, else one per ray_threads CPUs")
    ray_threads: int = Field(default=1, ge=1, description="torch threads (and CPUs reserved) per Ray actor")
    ray_max_retries: int = Field(default=2, ge=0, description="restarts of a dead Ray actor, retries of its shard")

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_token: str | None = Field(default=None, description="bearer token for writes; required beyond loopback")
    allowed_hosts: str = Field(default=",".join(LOOPBACK_HOSTS),
                               description="comma-separated Host header names the API answers ('*': any)")
    api_url: str = Field(default="http://127.0.0.1:8000",
                         description="where the dashboard (and the demo) reach the API; when unset, "
                                     "http://<api_host>:<api_port> (127.0.0.1 for a wildcard host)")
    dash_host: str = "127.0.0.1"
    dash_port: int = 8050

    llm_base_url: str | None = None
    llm_api_key: str | None = None
    llm_model: str | None = None

    @model_validator(mode="after")
    def _api_url_follows_port(self) -> Settings:
        if "api_url" not in self.model_fields_set:
            host = "127.0.0.1" if self.api_host in ("0.0.0.0", "::", "") else self.api_host
            self.api_url = f"http://{host}:{self.api_port}"
        return self

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.data_dir / 'piescope.db'}"

    @property
    def allowed_host_names(self) -> frozenset[str]:
        """The Host names (no port, lower case) the API answers; {'*'} answers any."""
        return frozenset(h.strip().lower().strip("[]") for h in self.allowed_hosts.split(",") if h.strip())


def get_settings() -> Settings:
    return Settings()
