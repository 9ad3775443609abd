"""Service configuration: every setting of ``gradstore serve``, read from ``GRADSTORE_*`` variables.

``Settings()`` reads the environment (``GRADSTORE_ROOT``, ``GRADSTORE_API_KEYS=key1,key2``, ...);
keyword arguments (the CLI flags that were given) take precedence over it. List settings accept a
comma-separated string or a JSON list.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1 << 20


class ConfigurationError(ValueError):
    """The settings cannot run a service (for instance: no API key and auth not disabled)."""


def _split_list(value: Any) -> Any:
    """``"a,b"`` or ``'["a", "b"]'`` -> ``["a", "b"]``; lists pass through."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [part.strip() for part in text.split(",") if part.strip()]


class Settings(BaseSettings):
    """Configuration of one service instance."""

    model_config = SettingsConfigDict(env_prefix="GRADSTORE_", extra="ignore")

    root: Path = Field(description="folder whose sub-folders are the served datastores")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)

    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="accepted API keys")
    api_key_file: Path | None = Field(None, description="file with one API key per line (# comments)")
    api_key_header: str = "X-API-Key"
    auth_disabled: bool = Field(False, description="serve without authentication (only when explicitly true)")

    max_k: int = Field(10_000, ge=1)
    max_targets: int = Field(256, ge=1)
    max_target_record_chars: int = Field(
        256 * 1024, ge=1, description="characters of text in one target record (refused before tokenising)")
    max_body_bytes: int = Field(8 * MiB, ge=1)
    max_json_depth: int = Field(64, ge=1, le=200, description=(
        "deepest nesting of arrays and objects in a request body (the parsers recurse once per level)"))
    max_page_size: int = Field(10_000, ge=1)
    selection_cache_size: int = Field(32, ge=1)
    verify_checksums: bool = Field(
        False, description="hash every file of a datastore against its manifest's sha256 when the store is opened "
                           "(reads the whole store; sizes, Parquet footers and the index are always checked)")

    job_input_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="folders that job input paths must lie in (default: root)")
    export_dir: Path | None = Field(None, description="where selections are exported (default: root/.exports)")

    _split = field_validator("api_keys", "job_input_roots", mode="before")(_split_list)

    @field_validator("root")
    @classmethod
    def _existing_root(cls, root: Path) -> Path:
        if not root.is_dir():
            raise ValueError(f"{root} is not a directory")
        return root.resolve()

    @model_validator(mode="after")
    def _resolve_paths(self):
        if not self.job_input_roots:
            self.job_input_roots = [self.root]
        self.job_input_roots = [path.resolve() for path in self.job_input_roots]
        if self.export_dir is None:
            self.export_dir = self.root / ".exports"
        self.export_dir = self.export_dir.resolve()
        return self

    def load_api_keys(self) -> frozenset[str]:
        """The accepted keys (``api_keys`` plus the lines of ``api_key_file``).

        Raises :class:`ConfigurationError` when there is none and auth is not disabled, or when
        the key file cannot be read.
        """
        keys = {key.strip() for key in self.api_keys if key.strip()}
        if self.api_key_file is not None:
            keys |= _read_key_file(self.api_key_file)
        if not keys and not self.auth_disabled:
            raise ConfigurationError(
                "no API key configured: give --api-key / --api-key-file (or GRADSTORE_API_KEYS / "
                "GRADSTORE_API_KEY_FILE), or disable authentication explicitly with --no-auth "
                "(GRADSTORE_AUTH_DISABLED=true)")
        return frozenset(keys)


def _read_key_file(path: Path) -> set[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise ConfigurationError(f"cannot read the API key file {path}: {err}") from err
    return {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
