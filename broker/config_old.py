"""Configuration: one YAML file validated by pydantic v2 models.

Every error names the key and the problem (``listeners.0.bind: ...``); callers print
``ConfigError`` as is, never a traceback.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from broker.mqtt.framer import MQTT_MAX_PACKET


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

    @model_validator(mode="after")
    def _client_certs(self) -> ListenerTlsConfig:
        for key in ("require_client_cert", "use_identity_as_username"):
            if getattr(self, key) and self.client_ca is None:
                raise ValueError(f"{key} needs client_ca (the CA bundle that signs client certificates)")
        if self.server_names is not None and not all(name.strip() for name in self.server_names or [""]):
            raise ValueError("server_names must list at least one non-empty name (omit it to accept any name)")
        return self


_WS_ONLY_KEYS = (
    "path",
    "allowed_origins",
    "allowed_hosts",
    "trusted_proxies",
    "max_frame_size",
    "require_subprotocol",
    "handshake_timeout",  # also valid on tcp listeners with tls or proxy_protocol (TLS handshake, PROXY header)
    "compression",
)


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

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or any(c in value for c in "?# ") or not value.isprintable():
            raise ValueError(f"{value!r}: an absolute path such as / or /mqtt (no query, no spaces)")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network (10.0.0.0/8, ::1)") from None
        return value

    @model_validator(mode="after")
    def _ws_only(self) -> ListenerConfig:
        if self.type != "ws":
            for key in _WS_ONLY_KEYS:
                if key == "handshake_timeout" and (self.tls is not None or self.proxy_protocol):
                    continue
                if getattr(self, key) != ListenerConfig.model_fields[key].get_default(call_default_factory=True):
                    raise ValueError(f"{key} is only valid on type: ws listeners")
        return self

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_hostport(self.bind)


def _upstream_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"{value!r}: scheme must be mqtt:// (plain) or mqtts:// (TLS), then host:port")
    if not parts.hostname:
        raise ValueError(f"{value!r} has no host")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc}") from None
    return value


UpstreamUrl = Annotated[str, AfterValidator(_upstream_url)]


class UpstreamTlsConfig(_Model):
    """TLS from the front broker to the internal broker (``mqtts://`` upstream URLs)."""

    ca: Path | None = None  # CA bundle the upstream's certificate must chain to (default: the system store)
    cert: Path | None = None  # the front broker's client certificate (brokers that require mTLS)
    key: Path | None = None  # its private key (may be omitted if it is in the cert file)
    server_hostname: str | None = None  # name to verify and send as SNI (default: the URL's host)
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    verify: bool = True  # false: the upstream's certificate is NOT checked (a loud warning at start-up)
    session_resumption: bool = True  # resume TLS sessions so reconnect storms skip full handshakes

    @model_validator(mode="after")
    def _key_needs_cert(self) -> UpstreamTlsConfig:
        if self.key is not None and self.cert is None:
            raise ValueError("key is set without cert (the client certificate it belongs to)")
        return self


class UpstreamConfig(_Model):
    url: UpstreamUrl | None = None  # one upstream; or
    urls: list[UpstreamUrl] | None = None  # several, tried in order (failover) or in turn (round_robin)
    strategy: Literal["failover", "round_robin"] = "failover"
    tls: UpstreamTlsConfig | None = None
    username: str | None = None
    password: str | None = None
    connect_timeout: float = Field(default=5.0, gt=0)  # per upstream tried, TCP and TLS handshake

    @model_validator(mode="after")
    def _urls(self) -> UpstreamConfig:
        if (self.url is None) == (self.urls is None):
            raise ValueError("give either url or urls (a list), not both and not neither")
        urls = self.all_urls
        if not urls:
            raise ValueError("urls is empty")
        if len(set(urls)) != len(urls):
            raise ValueError("urls has duplicates")
        schemes = {urlsplit(u).scheme for u in urls}
        if len(schemes) > 1:
            raise ValueError(
                "urls mixes mqtt:// and mqtts://: a plain upstream in a TLS list would silently "
                "downgrade the internal traffic; use one scheme for all"
            )
        if self.tls is not None and schemes == {"mqtt"}:
            raise ValueError("tls is set but the upstream URLs are plain mqtt://; use mqtts://")
        return self

    @property
    def all_urls(self) -> list[str]:
        return [self.url] if self.url is not None else list(self.urls or [])

    @property
    def uses_tls(self) -> bool:
        return urlsplit(self.all_urls[0]).scheme == "mqtts"

    @property
    def endpoints(self) -> list[tuple[str, str, int]]:
        """(url, host, port) of every upstream, in the configured order."""
        out = []
        for url in self.all_urls:
            parts = urlsplit(url)
            assert parts.hostname is not None
            out.append((url, parts.hostname, parts.port or (8883 if parts.scheme == "mqtts" else 1883)))
        return out

    @property
    def host_port(self) -> tuple[str, int]:
        _, host, port = self.endpoints[0]
        return host, port


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


class Config(_Model):
    listeners: Annotated[list[ListenerConfig], Field(min_length=1)]
    upstream: UpstreamConfig | None = None
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    acl: AclConfig = AclConfig()
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig | None = None

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
