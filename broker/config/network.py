"""The network parts of the configuration: listeners (with their TLS) and the upstream broker."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import AfterValidator, Field, field_validator, model_validator

from broker.config.base import _Model, parse_hostport, redact_url


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
    shown = redact_url(value)  # an error message is output too: never the password of the userinfo
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"{shown!r}: scheme must be mqtt:// (plain) or mqtts:// (TLS), then host:port")
    if not parts.hostname:
        raise ValueError(f"{shown!r} has no host")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"{shown!r}: {exc}") from None
    return value


def _userinfo(url: object) -> tuple[str, str | None] | None:
    """(username, password) of ``scheme://user:password@host``, percent-decoded; None without userinfo."""
    if not isinstance(url, str):
        return None
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return None
    return unquote(parts.username or ""), unquote(parts.password) if parts.password is not None else None


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
    # The password is its first line; relative to the configuration file; read at load and on every reload.
    password_file: Path | None = None
    connect_timeout: float = Field(default=5.0, gt=0)  # per upstream tried, TCP and TLS handshake
    # true: the embedded broker (as with no upstream section), said explicitly, which also lets it serve
    # listeners on non-loopback addresses (see broker.upstream.embedded); no url, urls or credentials then.
    embedded: bool = False

    @model_validator(mode="before")
    @classmethod
    def _credentials_from_userinfo(cls, data: Any) -> Any:
        """``mqtt://front:s3cret@host`` is the front broker's identity upstream: the same as username and
        password. Given twice (userinfo and the keys, or two different userinfos) it is refused, not guessed."""
        if not isinstance(data, dict):
            return data
        urls = data.get("urls") if data.get("url") is None else [data["url"]]
        if not isinstance(urls, list):
            return data
        found = {_userinfo(url) for url in urls}
        if found <= {None}:
            return data
        if len(found) > 1:
            raise ValueError("urls differ in their user:password@: give the credentials once, as username and password")
        if any(data.get(key) is not None for key in ("username", "password", "password_file")):
            raise ValueError("the URL has user:password@ and username/password are set too: give the credentials once")
        username, password = found.pop() or ("", None)
        return {**data, "username": username, "password": password}

    @model_validator(mode="after")
    def _one_password(self) -> UpstreamConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give either password or password_file, not both")
        return self

    @model_validator(mode="after")
    def _urls(self) -> UpstreamConfig:
        if self.embedded:
            extra = sorted(self.model_fields_set - {"embedded", "connect_timeout"})
            if extra:
                raise ValueError(
                    f"embedded: true runs the embedded broker, which the front broker configures itself: "
                    f"remove {', '.join(extra)} (or set embedded: false to use your own broker)"
                )
            return self
        if (self.url is None) == (self.urls is None):
            raise ValueError("give either url or urls (a list), not both and not neither (or embedded: true)")
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
        """The URLs as logs and output show them (a userinfo's password starred: the credentials are in
        ``username`` and ``password``); labels, targets and ``check`` all read these."""
        return [redact_url(url) for url in ([self.url] if self.url is not None else (self.urls or []))]

    @property
    def uses_tls(self) -> bool:
        urls = self.all_urls  # none with embedded: true
        return bool(urls) and urlsplit(urls[0]).scheme == "mqtts"

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
