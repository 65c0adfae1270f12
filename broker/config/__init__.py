"""Configuration: one YAML file validated by pydantic v2 models.

Every error names the key and the problem (``listeners.0.bind: ...``, with the hint of
:mod:`broker.config.hints`); callers print ``ConfigError`` as is, never a traceback. Reading the file, the
``MQTT_FRONT_...`` environment overrides and secret files is :mod:`broker.config.loading`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from broker.config.base import ConfigError, _Model, parse_hostport, redact_url
from broker.config.binds import Bind, config_binds, literal_overlap
from broker.config.hints import format_errors
from broker.config.loading import apply_environment, read_secret, read_yaml, safe_load
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
    "StoreConfig",
    "UpstreamConfig",
    "UpstreamTlsConfig",
    "UpstreamUrl",
    "load_config",
    "parse_config",
    "parse_hostport",
    "redact_url",
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


class RateConfig(_Model):
    """A token bucket pair: messages and bytes per second, each with its burst (default: one second's worth)."""

    messages: float | None = Field(default=None, gt=0)  # PUBLISH packets per second; None: no message limit
    messages_burst: float | None = Field(default=None, gt=0)
    bytes: float | None = Field(default=None, gt=0)  # PUBLISH bytes per second; None: no byte limit
    bytes_burst: float | None = Field(default=None, gt=0)


class PublishRateConfig(_Model):
    # Per connection, and per team (all its connections in this process together; with --workers N, per worker).
    client: RateConfig | None = Field(default_factory=lambda: RateConfig(messages=10_000, messages_burst=20_000))
    team: RateConfig | None = None
    # pause: stop reading the client until tokens refill (nothing is lost, TCP pushes back);
    # disconnect: v5 DISCONNECT 0x96 (message rate too high), v3.1.1 close.
    action: Literal["pause", "disconnect"] = "pause"


class ConnectRateConfig(_Model):
    per_source: float = Field(gt=0)  # new connections per second from one source address
    burst: float | None = Field(default=None, gt=0)  # default: one second's worth


def _redis_url(value: str) -> str:
    parts, shown = urlsplit(value), redact_url(value)  # an error message is output too: never the password
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"{shown!r}: redis://host:port/db (plain) or rediss://host:port/db (TLS)")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"{shown!r}: {exc}") from None
    if (db := parts.path.strip("/")) and not db.isdigit():
        raise ValueError(f"{shown!r}: the path is the database number (/0), nothing else")
    return value


class StoreConfig(_Model):
    """``limits.store``: the per-team connection cap counted over all replicas in Redis (broker.cluster_store)."""

    url: Annotated[str, AfterValidator(_redis_url)]  # a password in it (redis://:pw@host) is starred in logs
    password: str | None = None
    password_file: Path | None = None  # its first line; relative to the configuration file; read at load
    ca_file: Path | None = None  # rediss://: verify the server against this CA bundle (default: the system's)
    # The store cannot answer in time: closed refuses a team connection (CONNACK server unavailable),
    # open lets it in on this process's count alone.
    on_error: Literal["closed", "open"] = "closed"
    timeout: float = Field(default=0.25, gt=0)  # seconds a CONNECT may wait for the store
    key_prefix: str = Field(default="mqtt-front", min_length=1)
    heartbeat: float = Field(default=2.0, gt=0)  # seconds between refreshes of this process's registration
    ttl: float = Field(default=10.0, gt=0)  # a process not heard of this long no longer counts (a killed one)

    @model_validator(mode="before")
    @classmethod
    def _bare_url(cls, data: Any) -> Any:
        return {"url": data} if isinstance(data, str) else data  # limits.store: redis://host:6379/0

    @model_validator(mode="after")
    def _consistent(self) -> StoreConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give either password or password_file, not both")
        if (self.password or self.password_file) and urlsplit(self.url).password is not None:
            raise ValueError("the URL has :password@ and password/password_file is set too: give it once")
        if self.ca_file is not None and not self.url.startswith("rediss://"):
            raise ValueError("ca_file is set but the URL is plain redis://; use rediss://")
        if self.ttl <= self.heartbeat:
            raise ValueError("ttl must be longer than heartbeat, or a live process would expire between two")
        return self


class LimitsConfig(_Model):
    max_packet_size: int = Field(default=1_048_576, ge=64, le=MQTT_MAX_PACKET)
    connect_timeout: float = Field(default=10.0, gt=0)
    # SIGTERM / ctl drain: seconds from the signal to the exit (README "Stopping: the drain").
    shutdown_timeout: float = Field(default=10.0, gt=0)
    # Caps per process (with --workers N, per worker): None = no cap.
    max_connections: int | None = Field(default=None, ge=1)
    max_connections_per_team: int | None = Field(default=None, ge=1)
    # Work budgets (README "Limits and failure behaviour"): what one packet or one read may cost.
    max_connect_size: int = Field(default=16_384, ge=64)  # the CONNECT is read before authentication
    max_user_properties: int = Field(default=64, ge=0)  # per packet (a will's properties count on their own)
    max_user_property_bytes: int = Field(default=16_384, ge=0)
    max_filters_per_packet: int = Field(default=100, ge=1)  # topic filters in one SUBSCRIBE or UNSUBSCRIBE
    max_topic_length: int = Field(default=4_096, ge=1, le=65_535)  # bytes of a topic name or filter
    max_topic_levels: int = Field(default=64, ge=1)
    max_alias_topic_length: int = Field(default=1_024, ge=1, le=65_535)  # what one topic alias may stand for
    max_subscriptions: int = Field(default=10_000, ge=1)  # filters one session may hold
    work_budget: int = Field(default=65_536, ge=1_024)  # about bytes decoded per read before the rest waits a turn
    publish_rate: PublishRateConfig = Field(default_factory=PublishRateConfig)
    connect_rate: ConnectRateConfig | None = None  # off: behind a balancer without PROXY protocol, one address
    store: StoreConfig | None = None  # max_connections_per_team over all replicas, counted in Redis


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{redact_url(value)!r} is not an http:// or https:// URL")
    return value


# Request headers the platform client frames itself (broker.auth.http_client): configured ones would
# contradict it (two lengths, a body read as chunks), so auth.http.headers refuses them.
FRAMING_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer", "keep-alive", "expect"}
)


def _no_framing_headers(headers: dict[str, str]) -> dict[str, str]:
    framing = sorted(name for name in headers if name.lower() in FRAMING_HEADERS)
    if framing:
        raise ValueError(f"{', '.join(framing)}: set by the platform client itself, not configurable")
    return headers


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
    headers: Annotated[dict[str, str], AfterValidator(_no_framing_headers)] = Field(default_factory=dict)
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

    @model_validator(mode="after")
    def _overlapping_binds(self) -> Config:
        # IP literals only: `check` also resolves names (broker.config.binds.resolved_overlap).
        overlap = literal_overlap(self.binds)
        if overlap is not None:
            raise ValueError(overlap)
        return self

    @property
    def binds(self) -> list[Bind]:
        """Every address it listens on, with its key: the listeners, metrics.bind, admin.bind."""
        return config_binds(
            self.listeners, self.metrics.bind if self.metrics else None, self.admin.bind if self.admin else None
        )


def parse_config(
    data: Any, base_dir: Path | None = None, sources: Mapping[tuple[str, ...], str] | None = None
) -> Config:
    """``data`` (a YAML document) validated; relative paths are relative to ``base_dir``, secret files are
    read. ``sources``: the keys environment variables set (:func:`broker.config.loading.apply_environment`),
    named in the errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the configuration must be a YAML mapping (key: value)")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration:\n{format_errors(exc, Config, sources)}") from None
    config = _read_secret_files(config, base_dir)
    config = _resolve_store(config, base_dir)
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


def _read_secret_files(config: Config, base_dir: Path | None) -> Config:
    """``upstream.password_file`` (relative to ``base_dir``) read into ``upstream.password``: at every load,
    so a reload sees a rotated secret. (``admin.token_file`` and ``auth.jwt.secret_file`` are read where
    they are used; ``auth.http.headers`` take ``file:/path`` values.)"""
    up = config.upstream
    if up is None or up.password_file is None:
        return config
    path = base_dir / up.password_file if base_dir is not None else up.password_file
    password = read_secret(path, "upstream.password_file")
    upstream = up.model_copy(update={"password_file": path, "password": password})
    return config.model_copy(update={"upstream": upstream})


def _resolve_store(config: Config, base_dir: Path | None) -> Config:
    """``limits.store``: a relative ca_file or password_file is relative to ``base_dir``; the password file is
    read at every load, like upstream's."""
    store = config.limits.store
    if store is None or (store.password_file is None and store.ca_file is None):
        return config

    def rel(path: Path | None) -> Path | None:
        return base_dir / path if path is not None and base_dir is not None and not path.is_absolute() else path

    update: dict[str, Any] = {"ca_file": rel(store.ca_file), "password_file": rel(store.password_file)}
    if update["password_file"] is not None:
        update["password"] = read_secret(update["password_file"], "limits.store.password_file")
    limits = config.limits.model_copy(update={"store": store.model_copy(update=update)})
    return config.model_copy(update={"limits": limits})


def load_config(path: str | Path) -> Config:
    """The configuration file ``path`` with the ``MQTT_FRONT_...`` environment variables over it (the
    environment wins); every problem is a ConfigError naming the file and the key."""
    path = Path(path)
    data = read_yaml(path)
    try:
        data, sources = apply_environment(data, Config)
        return parse_config(data, path.parent, sources)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
