"""Configuration: one YAML file validated by pydantic v2 models.

Every error names the key and the problem (``listeners.0.bind: ...``); callers print
``ConfigError`` as is, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from broker.codec import MQTT_MAX_PACKET


class ConfigError(Exception):
    """A configuration problem, worded for the operator."""


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"{value!r} is not host:port")
        host, port_text = value, str(default_port)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"{value!r} has no host")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{value!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{value!r}: port {port} out of range")
    return host, port


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenerTlsConfig(_Model):
    """TLS termination on a listener (mqtts on tcp, wss on ws)."""

    cert: Path
    key: Path
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    ciphers: str | None = None
    client_ca: Path | None = None  # verify client certificates against this CA bundle
    require_client_cert: bool = False
    use_identity_as_username: bool = False  # username from the certificate's CN (or a SAN); no password
    server_names: list[str] | None = None  # SNI: a handshake for any other name fails


class ListenerConfig(_Model):
    name: str = Field(min_length=1)
    type: Literal["tcp", "ws"] = "tcp"
    bind: str
    tls: ListenerTlsConfig | None = None
    proxy_protocol: bool = False  # expect a PROXY protocol v1/v2 header from a load balancer
    # WebSocket listeners only:
    path: str = "/"
    allowed_origins: list[str] | None = None
    allowed_hosts: list[str] | None = None
    trusted_proxies: list[str] = Field(default_factory=list)  # networks whose X-Forwarded-For is believed
    max_frame_size: int = Field(default=1_048_576, ge=128)
    require_subprotocol: bool = True
    handshake_timeout: float = Field(default=10.0, gt=0)
    compression: bool = False

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        parse_hostport(value)
        return value

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_hostport(self.bind)


class UpstreamConfig(_Model):
    url: str
    username: str | None = None
    password: str | None = None
    connect_timeout: float = Field(default=5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "mqtt":
            raise ValueError(f"{value!r}: scheme must be mqtt:// (host:port of the internal broker)")
        if not parts.hostname:
            raise ValueError(f"{value!r} has no host")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"{value!r}: {exc}") from None
        return value

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        assert parts.hostname is not None
        return parts.hostname, parts.port or 1883


class LimitsConfig(_Model):
    max_packet_size: int = Field(default=1_048_576, ge=64, le=MQTT_MAX_PACKET)
    connect_timeout: float = Field(default=10.0, gt=0)


class AuthConfig(_Model):
    users_file: Path | None = None
    allow_anonymous: bool = False
    cache_ttl: float = Field(default=60.0, ge=0)


class AclRuleConfig(_Model):
    who: Literal["project", "device", "platform", "teamclient", "user", "anonymous", "any"]
    effect: Literal["allow", "deny"]
    action: Literal["publish", "subscribe", "both"]
    pattern: str = Field(min_length=1)
    retain: bool | None = None


class AclConfig(_Model):
    preset: Literal["flowfuse", "none"] = "flowfuse"
    rules: list[AclRuleConfig] = Field(default_factory=list)
    share_groups: list[str] | None = None
    deny_action: Literal["ignore", "disconnect"] = "ignore"


class LoggingConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class Config(_Model):
    listeners: Annotated[list[ListenerConfig], Field(min_length=1)]
    upstream: UpstreamConfig | None = None
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    acl: AclConfig = AclConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _unique_listeners(self) -> Config:
        names = [item.name for item in self.listeners]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"listener names must be unique: {', '.join(dupes)}")
        binds = [item.bind for item in self.listeners]
        dupes = sorted({b for b in binds if binds.count(b) > 1})
        if dupes:
            raise ValueError(f"two listeners bind the same address: {', '.join(dupes)}")
        return self


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, base_dir: Path | None = None) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the configuration must be a YAML mapping (key: value)")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration:\n{_format_errors(exc)}") from None
    users_file = config.auth.users_file
    if users_file is not None and not users_file.is_absolute() and base_dir is not None:
        auth = config.auth.model_copy(update={"users_file": base_dir / users_file})
        config = config.model_copy(update={"auth": auth})
    return config


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    try:
        return parse_config(data, path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
