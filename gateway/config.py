"""The gateway's configuration as frozen, typed objects.

Every field's `doc` metadata feeds `ollama-gateway check`, the README's config reference
(tests compare the two) and the loader's error messages. Parsing and validation live in
`gateway.config_load`; this module only declares the shape and the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_UPSTREAM = "http://127.0.0.1:11434"
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_SHUTDOWN_GRACE = 30.0
# Above the idle timeout of a proxy in front (nginx: 60 s), so the proxy always closes first.
DEFAULT_CLIENT_IDLE_TIMEOUT = 75.0
DEFAULT_UPSTREAM_NAME = "default"  # the one server of `upstream:` (logs, metrics, prefix)
# Ollama's own OLLAMA_NUM_PARALLEL default since 0.10.
DEFAULT_SLOTS = 1
DEFAULT_METRICS_ROLES: tuple[str, ...] = ("admin",)
# An address (an office NAT) carries many users: it may fail this many times more than one user.
ADDRESS_CEILING_FACTOR = 10
# nginx's client_body_timeout: a client may pause its upload, not hold a connection forever.
DEFAULT_CLIENT_BODY_TIMEOUT = 60.0


class Secret:
    """A string whose repr never shows its value, so configs can be logged and printed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def doc(text: str, default: Any = None, **kw: Any) -> Any:
    """A dataclass field carrying its documentation."""
    return field(default=default, metadata={"doc": text}, **kw)


def required(text: str) -> Any:
    """A field the file must give (the loader reports it missing with its key path)."""
    return field(metadata={"doc": text, "required": True})


def doc_factory(text: str, factory: Any) -> Any:
    return field(default_factory=factory, metadata={"doc": text})


FROZEN = {"frozen": True, "slots": True, "kw_only": True}


@dataclass(**FROZEN)
class UpstreamConfig:
    url: str = doc("Ollama's base URL (http or https).", DEFAULT_UPSTREAM)
    connect_timeout: float = doc("Seconds to open a TCP connection to Ollama.", 5.0)
    read_timeout: float = doc(
        "Seconds without a byte from Ollama before the request fails with 504 "
        "(the first byte too, unless first_byte_timeout is set).",
        600.0,
    )
    first_byte_timeout: float | None = doc(
        "Seconds to wait for the first byte of a response (cold model loads take minutes).", None
    )
    max_connections: int = doc(
        "Connections to Ollama at once; more requests wait for one (0: no limit).", 0
    )
    slots: int = doc(
        "Inference requests per model this Ollama runs at once (its OLLAMA_NUM_PARALLEL, "
        "default 1): the gateway never sends more and holds the rest in its fair queue; "
        "0: no queue at the gateway.",
        DEFAULT_SLOTS,
    )
    model_slots: dict[str, int] = doc_factory(
        "Slots per model glob (`nomic-embed*: 1`), overriding `slots`; first match wins.", dict
    )


@dataclass(**FROZEN)
class NamedUpstreamConfig(UpstreamConfig):
    """One of several Ollama servers (`upstreams`): every `upstream` key, plus a name."""

    # No default address here: two servers silently on Ollama's default port is a typo.
    url: str = required("Ollama's base URL (http or https).")
    name: str = required(
        "Server name ([a-z0-9-]+), used in logs, metrics, `X-Ollama-Upstream: NAME` and the "
        "`/upstreams/NAME/` path prefix."
    )
    models: tuple[str, ...] | None = doc(
        "Model globs routed to this server (default: every model it lists).", None
    )


@dataclass(**FROZEN)
class TLSConfig:
    cert: str = required("PEM certificate chain file.")
    key: str = required("PEM private key file.")


@dataclass(**FROZEN)
class LimitsConfig:
    """Per-principal admission limits; an absent value means unlimited."""

    requests_per_minute: float | None = doc("Smooth request rate (GCRA).", None)
    burst: int | None = doc(
        "Requests allowed at once on top of the smooth rate (default: rate/6, at least 1).", None
    )
    concurrency: int | None = doc(
        "Requests in flight at once (a stream counts until it ends).", None
    )
    tokens_per_minute: int | None = doc("Prompt + completion tokens per rolling minute.", None)
    tokens_per_day: int | None = doc("Prompt + completion tokens per rolling day.", None)


@dataclass(**FROZEN)
class UserConfig:
    password: Secret = required(
        "A passlib hash (bcrypt, argon2, pbkdf2_sha256, sha512_crypt, apr1...)."
    )
    roles: tuple[str, ...] = doc("Roles of this user.", ("user",))
    models: tuple[str, ...] | None = doc("Model globs; overrides the roles' union when set.", None)
    limits: LimitsConfig | None = doc("Limits; each set value overrides the roles' value.", None)
    weight: float | None = doc("Share of the slots; overrides the roles' weight when set.", None)
    priority: int | None = doc("Queue priority; overrides the roles' priority when set.", None)


@dataclass(**FROZEN)
class ApiKeyConfig:
    name: str = required("A name for logs and metrics (never the key itself).")
    sha256: str = required("Hex sha256 of the key (`ollama-gateway new-key` prints it).")
    user: str | None = doc("User this key acts as (default: the key's name).", None)
    roles: tuple[str, ...] = doc("Roles granted by this key.", ("user",))
    expires: datetime | None = doc("Optional expiry (ISO 8601); refused afterwards.", None)


@dataclass(**FROZEN)
class JWTConfig:
    algorithms: tuple[str, ...] = doc("Accepted algorithms: HS*, RS*, PS*, ES*, EdDSA.", ("HS256",))
    secret: Secret | None = doc("Shared secret for HS* (at least 32 bytes).", None)
    public_key: str | None = doc("PEM public key file for RS*/PS*/ES*/EdDSA.", None)
    private_key: str | None = doc(
        "PEM private key file; only `ollama-gateway token` uses it.", None
    )
    jwks_url: str | None = doc("JWKS endpoint, fetched and cached; refreshed on unknown kid.", None)
    jwks_cache_seconds: float = doc("How long fetched JWKS keys are trusted.", 3600.0)
    jwks_min_refresh_seconds: float = doc("Least time between two JWKS refetches.", 30.0)
    issuer: str | None = doc("Required `iss` when set.", None)
    audience: str | None = doc("Required `aud` when set.", None)
    user_claim: str = doc("Claim naming the user.", "sub")
    roles_claim: str = doc("Claim holding roles (a list or a space-separated string).", "roles")
    leeway: float = doc("Clock skew allowed on exp/nbf/iat, seconds.", 30.0)


@dataclass(**FROZEN)
class LockoutConfig:
    """Brute-force protection, scoped to what is attacked (one user from one address).

    Failed passwords count per (client address, user): past `max_failures` that user's
    Basic attempts from that address get 429. Failures that name no known user (unknown
    users, malformed headers, bad keys and tokens) count per address: they slow the 401s
    down and, past `address_max_failures`, the address's logins that need a fresh password
    hash are refused without hashing. Other users, keys and tokens keep working.
    """

    max_failures: int = doc(
        "Failed passwords for one user from one address before that user gets 429 there "
        "(0: lockout off).",
        10,
    )
    window: float = doc("Seconds over which failures are counted.", 60.0)
    block_seconds: float = doc("How long a blocked user (or address) stays refused.", 300.0)
    address_max_failures: int | None = doc(
        "Failures from one address before its logins that need a fresh password hash are "
        "refused without hashing (default: 10 x max_failures).",
        None,
    )
    max_tracked: int = doc("Addresses and (address, user) pairs tracked at most.", 100_000)

    @property
    def address_ceiling(self) -> int:
        if self.address_max_failures is not None:
            return self.address_max_failures
        return ADDRESS_CEILING_FACTOR * self.max_failures


@dataclass(**FROZEN)
class AuthConfig:
    realm: str = doc("Realm in WWW-Authenticate.", "ollama-gateway")
    users: dict[str, UserConfig] = doc_factory("Basic users by name.", dict)
    htpasswd: str | None = doc("Apache/nginx htpasswd file (bcrypt, apr1, sha512-crypt...).", None)
    htpasswd_roles: tuple[str, ...] = doc("Roles of htpasswd users.", ("user",))
    api_keys: tuple[ApiKeyConfig, ...] = doc("API keys (sha256 of each).", ())
    jwt: JWTConfig | None = doc("JWT verification.", None)
    cache_seconds: float = doc("How long a verified password stays cached.", 300.0)
    cache_size: int = doc("Verified credentials cached at most.", 10_000)
    lockout: LockoutConfig = doc_factory("Brute-force protection.", LockoutConfig)

    @property
    def any_credentials(self) -> bool:
        return bool(self.users or self.htpasswd or self.api_keys or self.jwt)


@dataclass(**FROZEN)
class RoleConfig:
    models: tuple[str, ...] = doc("Globs of model names this role may use (none if empty).", ())
    limits: LimitsConfig | None = doc("Limits of this role.", None)
    weight: float = doc(
        "Share of the slots when users compete (tokens served in proportion to weight).", 1.0
    )
    priority: int = doc(
        "Waiting requests of a higher priority go first (a principal with several roles "
        "gets the highest).",
        0,
    )


@dataclass(**FROZEN)
class RouteRule:
    """One entry of the ordered route table; exactly one of public/authenticated/roles/deny."""

    path: str = required("Path or glob (`/v1/*`).")
    methods: tuple[str, ...] = doc("HTTP methods this rule covers (`*`: all).", ("*",))
    public: bool = doc("No credentials needed.", False)
    authenticated: bool = doc("Any authenticated principal.", False)
    roles: tuple[str, ...] | None = doc("Principals holding one of these roles.", None)
    deny: bool = doc("Refuse (403) even with credentials.", False)


@dataclass(**FROZEN)
class RateLimitsConfig:
    store: str = doc("`memory` or `redis://host:port/db` (shared by all replicas).", "memory")
    on_store_error: Literal["allow", "deny"] = doc("What to do when Redis is unreachable.", "deny")
    memory_max_keys: int = doc("Principals tracked at most by the memory store.", 100_000)


@dataclass(**FROZEN)
class SchedulerConfig:
    """The fair queue in front of the slots (`upstream.slots`)."""

    max_queue_per_user: int = doc(
        "Requests of one user waiting at once; more get 429 + Retry-After.", 16
    )
    max_queue: int = doc("Requests waiting in all; more get 503 + Retry-After.", 256)
    queue_timeout: float = doc(
        "Seconds a request may wait for a slot; then 503 + Retry-After.", 300.0
    )


@dataclass(**FROZEN)
class CorsConfig:
    origins: tuple[str, ...] = doc("Allowed browser origins (`*` for any); empty: CORS off.", ())
    max_age: int = doc("Seconds browsers may cache a preflight.", 600)


@dataclass(**FROZEN)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = doc("Log level.", "info")
    format: Literal["json", "text"] = doc("Access and event log format.", "json")
    access_log: bool = doc("One line per request.", True)


@dataclass(**FROZEN)
class MetricsConfig:
    enabled: bool = doc("Serve Prometheus metrics.", True)
    path: str = doc("Path of the metrics endpoint.", "/metrics")
    public: bool = doc("No credentials needed (say so explicitly on non-loopback).", False)
    roles: tuple[str, ...] = doc("Roles that may read metrics.", DEFAULT_METRICS_ROLES)
    user_label: bool = doc("Per-user series (turn off for huge user counts).", True)
    listen: str | None = doc("Separate HOST:PORT listener for metrics only.", None)


def _default_roles() -> dict[str, RoleConfig]:
    return {"user": RoleConfig(models=("*",)), "admin": RoleConfig(models=("*",))}


@dataclass(**FROZEN)
class GatewayConfig:
    listen: str = doc("HOST:PORT to listen on.", DEFAULT_LISTEN)
    upstream: UpstreamConfig = doc_factory("Where Ollama is.", UpstreamConfig)
    upstreams: tuple[NamedUpstreamConfig, ...] | None = doc(
        "Instead of `upstream`: several Ollama servers behind one gateway, routed by model.",
        None,
    )
    tls: TLSConfig | None = doc("Serve HTTPS with this certificate.", None)
    max_body_bytes: int = doc(
        "Largest JSON request body (413 beyond); blob uploads stream unlimited.",
        DEFAULT_MAX_BODY_BYTES,
    )
    trusted_proxies: tuple[str, ...] = doc("CIDRs whose X-Forwarded-For is believed.", ())
    shutdown_grace: float = doc(
        "Seconds SIGTERM waits for in-flight streams.", DEFAULT_SHUTDOWN_GRACE
    )
    client_idle_timeout: float = doc(
        "Seconds a client connection may stay idle; a request's headers must also arrive "
        "within this time of the connection opening or the previous response (slow clients "
        "cannot hold connections). Keep it above the idle timeout of a proxy in front.",
        DEFAULT_CLIENT_IDLE_TIMEOUT,
    )
    client_body_timeout: float = doc(
        "Seconds a request body may go without a byte from the client: 408 before anything "
        "reached Ollama; else the upstream request is reset and the client connection closed.",
        DEFAULT_CLIENT_BODY_TIMEOUT,
    )
    auth: AuthConfig = doc_factory("Who may call.", AuthConfig)
    roles: dict[str, RoleConfig] = doc_factory(
        "Roles: model globs and limits (default: `user` and `admin`, all models).", _default_roles
    )
    routes: tuple[RouteRule, ...] | None = doc(
        "Ordered route table (first match wins; no match: 403). Absent: the built-in table.", None
    )
    rate_limits: RateLimitsConfig = doc_factory("Where limits are counted.", RateLimitsConfig)
    scheduler: SchedulerConfig = doc_factory(
        "The fair queue in front of the upstream's slots.", SchedulerConfig
    )
    cors: CorsConfig = doc_factory("Browser CORS, answered by the gateway.", CorsConfig)
    logging: LoggingConfig = doc_factory("Logs.", LoggingConfig)
    metrics: MetricsConfig = doc_factory("Prometheus metrics.", MetricsConfig)

    @property
    def servers(self) -> tuple[tuple[str, UpstreamConfig], ...]:
        """(name, settings) of every Ollama server: `upstreams`, or `upstream` as `default`."""
        if self.upstreams:
            return tuple((u.name, u) for u in self.upstreams)
        return ((DEFAULT_UPSTREAM_NAME, self.upstream),)
