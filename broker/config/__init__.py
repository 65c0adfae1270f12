"""Configuration: one YAML file validated by pydantic v2 models.

Every error names the key and the problem (``listeners.0.bind: ...``); callers print
``ConfigError`` as is, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from broker.config.base import ConfigError, _Model, parse_hostport
from broker.config.network import (
    ListenerConfig,
    ListenerTlsConfig,
    UpstreamConfig,
    UpstreamTlsConfig,
    UpstreamUrl,
)
from broker.mqtt.framer import MQTT_MAX_PACKET

__all__ = [
    "AclConfig",
    "AclRuleConfig",
    "AdminConfig",
    "AuthConfig",
    "Config",
    "ConfigError",
    "HttpAuthConfig",
    "InventoryConfig",
    "JwtAlgorithm",
    "JwtAuthConfig",
    "LimitsConfig",
    "ListenerConfig",
    "ListenerTlsConfig",
    "LoggingConfig",
    "MetricsConfig",
    "UpstreamConfig",
    "UpstreamTlsConfig",
    "UpstreamUrl",
    "load_config",
    "parse_config",
    "parse_hostport",
    "safe_load",
]


def _resolve_upstream_paths(config: Config, base_dir: Path) -> Config:
    """Relative upstream.tls file paths are relative to the configuration file's folder."""
    up = config.upstream
    if up is None or up.tls is None:
        return config
    tls = up.tls
    update = {
        name: base_dir / path
        for name in ("ca", "cert", "key")
        if (path := getattr(tls, name)) is not None and not path.is_absolute()
    }
    if not update:
        return config
    upstream = up.model_copy(update={"tls": tls.model_copy(update=update)})
    return config.model_copy(update={"upstream": upstream})


class LimitsConfig(_Model):
    max_packet_size: int = Field(default=1_048_576, ge=64, le=MQTT_MAX_PACKET)
    connect_timeout: float = Field(default=10.0, gt=0)
    # Caps per process (with --workers N, per worker): None = no cap.
    max_connections: int | None = Field(default=None, ge=1)
    max_connections_per_team: int | None = Field(default=None, ge=1)


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return value


class HttpAuthConfig(_Model):
    """The platform decides (``auth.http``): EMQX 5's HTTP authn/authz protocol, or mosquitto-go-auth's."""

    style: Literal["emqx", "go-auth"] = "emqx"
    auth_url: Annotated[str, AfterValidator(_http_url)]
    acl_url: Annotated[str, AfterValidator(_http_url)] | None = None  # needed with acl.source: http
    timeout: float = Field(default=5.0, gt=0)  # seconds per request; then the answer is "deny"
    cache_ttl: float = Field(default=60.0, ge=0)  # seconds an allow is reused
    negative_cache_ttl: float = Field(default=5.0, ge=0)  # seconds a deny is reused
    max_concurrency: int = Field(default=64, ge=1)  # requests in flight to the platform
    # Header values: a literal, or "file:/path" (the file's first line) or "env:NAME" (resolved at start).
    headers: dict[str, str] = Field(default_factory=dict)
    ca_file: Path | None = None  # verify an https:// platform against this CA bundle (default: the system's)
    honor_superuser: bool = False  # emqx: is_superuser true skips ACL calls
    team_attr: str = "team"  # emqx: the client_attrs key holding the session's mountpoint


JwtAlgorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384"]
_DEFAULT_JWT_ALGORITHMS: tuple[JwtAlgorithm, ...] = ("HS256", "RS256", "ES256")


class JwtAuthConfig(_Model):
    """JSON Web Tokens (``auth.jwt``) for browsers and short-lived clients."""

    token_from: Literal["password", "username"] = "password"
    algorithms: list[JwtAlgorithm] = Field(default_factory=lambda: list(_DEFAULT_JWT_ALGORITHMS), min_length=1)
    secret: str | None = None  # HS256 shared secret
    secret_file: Path | None = None
    public_keys: list[Path] = Field(default_factory=list)  # PEM public keys (RS256/ES256)
    jwks_file: Path | None = None  # a JWKS document; re-read on SIGHUP
    issuer: str | None = None
    audience: str | None = None
    leeway: float = Field(default=30.0, ge=0)  # seconds of clock skew allowed on exp/nbf/iat
    identity_claim: str = "sub"  # the claim that becomes the MQTT identity (username)
    acl_claim: str | None = "acl"  # EMQX-style [{permission, action, topic}], applied before other rules
    mountpoint_claim: str | None = None

    @model_validator(mode="after")
    def _keys(self) -> JwtAuthConfig:
        if not (self.secret or self.secret_file or self.public_keys or self.jwks_file):
            raise ValueError("auth.jwt needs a key: secret, secret_file, public_keys or jwks_file")
        return self


class AuthConfig(_Model):
    users_file: Path | None = None
    allow_anonymous: bool = False
    cache_ttl: float = Field(default=60.0, ge=0)
    max_pending: int = Field(default=1024, ge=1)  # queued password checks; more: CONNACK server busy
    http: HttpAuthConfig | None = None  # asked after users_file: a user known to the file is decided by it
    jwt: JwtAuthConfig | None = None


IdentityKindName = Literal[
    "project",
    "device",
    "platform",
    "teamclient",
    "teamnode",
    "teamagent",
    "frontend",
    "teamfrontend",
    "expertclient",
    "expertagent",
    "user",
]


class AclRuleConfig(_Model):
    who: IdentityKindName | Literal["anonymous", "any"]
    effect: Literal["allow", "deny"]
    action: Literal["publish", "subscribe", "both"]
    pattern: str = Field(min_length=1)
    retain: bool | None = None


class AclConfig(_Model):
    source: Literal["local", "http"] = "local"  # http: the platform (auth.http.acl_url) decides every check
    preset: Literal["flowfuse", "none"] = "flowfuse"
    rules: list[AclRuleConfig] = Field(default_factory=list)
    share_groups: list[str] | None = None
    deny_action: Literal["ignore", "disconnect"] = "ignore"
    # Team Broker identities: the client id must equal the username; true also allows "<username>:<anything>".
    client_id_suffix: bool = False
    # Mountpoints of local identities by kind, e.g. {teamclient: "ff/v1/${team}/c/"}; placeholders as in rules.
    mountpoints: dict[IdentityKindName, str] = Field(default_factory=dict)


class LoggingConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class MetricsConfig(_Model):
    """Prometheus /metrics, /healthz and /readyz on one HTTP port (off unless ``bind`` is set)."""

    bind: str | None = None  # host:port of the HTTP endpoint
    max_teams: int = Field(default=1000, ge=1)  # distinct team labels; later teams are counted as "_other"
    ready_window: float = Field(default=10.0, gt=0)  # an upstream connect this recent makes /readyz ready
    probe_interval: float = Field(default=2.0, gt=0)  # otherwise a TCP probe of the upstream, at most this often

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str | None) -> str | None:
        if value is not None:
            parse_hostport(value)
        return value

    @property
    def host_port(self) -> tuple[str, int] | None:
        return parse_hostport(self.bind) if self.bind is not None else None


class AdminConfig(_Model):
    """The admin REST API (off unless set): its own listener, a bearer token (``token`` or ``token_file``)."""

    bind: str  # host:port
    token: str | None = Field(default=None, min_length=16)
    token_file: Path | None = None  # the token is its first line; relative to the configuration file

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        parse_hostport(value)
        return value

    @model_validator(mode="after")
    def _one_token(self) -> AdminConfig:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("give either token or token_file, not both and not neither")
        return self


class InventoryConfig(_Model):
    """The topic inventory per team (off unless set): what the admin API's /teams/{team}/topics lists."""

    max_topics_per_team: int = Field(default=5000, ge=1)  # the least recently seen go first
    ttl: float = Field(default=86400.0, gt=0)  # seconds a topic stays listed after it was last seen
    max_teams: int = Field(default=1000, ge=1)  # about 300 bytes per topic: max_teams x max_topics_per_team
    samples: int = Field(default=3, ge=0)  # messages per topic whose payload kind is sampled (0: none)


class Config(_Model):
    listeners: Annotated[list[ListenerConfig], Field(min_length=1)]
    upstream: UpstreamConfig | None = None
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    acl: AclConfig = AclConfig()
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig | None = None
    admin: AdminConfig | None = None
    inventory: InventoryConfig | None = None

    @model_validator(mode="after")
    def _acl_source(self) -> Config:
        if self.acl.source == "http" and (self.auth.http is None or self.auth.http.acl_url is None):
            raise ValueError("acl.source: http needs auth.http.acl_url")
        return self

    @model_validator(mode="after")
    def _unique_listeners(self) -> Config:
        names = [item.name for item in self.listeners]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"listener names must be unique: {', '.join(dupes)}")
        binds = [item.bind for item in self.listeners if item.host_port[1] != 0]  # port 0: any free port
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
    if base_dir is not None:
        config = _resolve_auth_paths(config, base_dir)
    if base_dir is not None:
        config = _resolve_upstream_paths(config, base_dir)
        config = _resolve_listener_tls_paths(config, base_dir)
        if config.admin is not None and config.admin.token_file is not None:
            admin = config.admin.model_copy(update={"token_file": base_dir / config.admin.token_file})
            config = config.model_copy(update={"admin": admin})
    return config


def _resolve_auth_paths(config: Config, base_dir: Path) -> Config:
    """Relative users_file, auth.http.ca_file and auth.jwt key paths are relative to the configuration's folder."""

    def rel(path: Path | None) -> Path | None:
        return base_dir / path if path is not None and not path.is_absolute() else path

    auth = config.auth
    update: dict[str, Any] = {"users_file": rel(auth.users_file)}
    if auth.http is not None:
        update["http"] = auth.http.model_copy(update={"ca_file": rel(auth.http.ca_file)})
    if auth.jwt is not None:
        jwt = auth.jwt
        update["jwt"] = jwt.model_copy(
            update={
                "secret_file": rel(jwt.secret_file),
                "jwks_file": rel(jwt.jwks_file),
                "public_keys": [rel(path) for path in jwt.public_keys],
            }
        )
    return config.model_copy(update={"auth": auth.model_copy(update=update)})


def _resolve_listener_tls_paths(config: Config, base_dir: Path) -> Config:
    """Relative listener tls cert/key/client_ca paths are relative to the configuration file's folder."""
    listeners = []
    for listener in config.listeners:
        tls = listener.tls
        update = {
            name: base_dir / path
            for name in ("cert", "key", "client_ca")
            if tls is not None and (path := getattr(tls, name)) is not None and not path.is_absolute()
        }
        if tls is not None and update:
            listener = listener.model_copy(update={"tls": tls.model_copy(update=update)})
        listeners.append(listener)
    return config.model_copy(update={"listeners": listeners})


# libyaml's safe loader when PyYAML has it: the same documents, ~10x faster (a users file of 10,000
# entries is read on every reload).
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_SafeLoader)


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (a bad byte at offset {exc.start})") from None
    try:
        data = safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    try:
        return parse_config(data, path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
