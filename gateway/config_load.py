"""YAML -> GatewayConfig: env expansion, typed conversion, every problem with its key path.

The converter walks the dataclass type hints, so a new config field needs no parsing code.
Unknown keys are errors: a typo such as `publc: true` must never silently change security.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from gateway.config import DEFAULT_METRICS_ROLES, GatewayConfig, Secret, UpstreamConfig

ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# `${NAME}` with NAME_FILE set reads that file instead (secrets kept out of the environment,
# where `docker inspect` and /proc/PID/environ show them).
FILE_SUFFIX = "_FILE"
MAX_SECRET_FILE_BYTES = 65_536  # a PEM key or a password, not a mistaken path to a big file
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
_MISSING = object()


@dataclass(frozen=True, slots=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.message}"


class ConfigError(Exception):
    """The config file is unusable; `problems` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# A semantic check gets the converted config and returns problems. Modules that own a
# concern (auth, policy, limits) register theirs so this file stays about shape only.
Check = Callable[[GatewayConfig], Iterable[Problem]]
_CHECKS: list[Check] = []


def register_check(check: Check) -> Check:
    _CHECKS.append(check)
    return check


def load_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Read, expand, convert and validate; raise ConfigError listing every problem."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem("", f"cannot read {file}: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([Problem("", f"{file} is not UTF-8")]) from None
    return parse_config(text, env=env, base_dir=file.parent)


def parse_config(
    text: str, *, env: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> GatewayConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([Problem("", f"{problem}{where}")]) from None
    if raw is None:
        raw = {}
    problems: list[Problem] = []
    if isinstance(raw, dict) and "upstream" in raw and "upstreams" in raw:
        # Only the file tells whether `upstream` was written (it has defaults).
        problems.append(Problem("upstreams", "set either `upstream` or `upstreams`, not both"))
    raw = _expand_env(raw, os.environ if env is None else env, "", problems)
    config = _convert(raw, GatewayConfig, "", problems)
    if isinstance(config, GatewayConfig):
        if base_dir is not None:
            config = _resolve_paths(config, base_dir)
        # Semantic checks run even after shape problems, so one `check` lists everything.
        shape_ok = not problems
        for check in (*_BUILTIN_CHECKS, *_CHECKS):
            try:
                problems.extend(check(config))
            except (AttributeError, TypeError):
                if shape_ok:  # a check that fails on a well-formed config is a bug: surface it
                    raise
                # else a part it reads failed to convert; that is already reported
    if problems:
        raise ConfigError(_first_per_path(problems))
    assert isinstance(config, GatewayConfig)
    return config


def _first_per_path(problems: list[Problem]) -> list[Problem]:
    seen: set[str] = set()
    unique = []
    for problem in problems:
        if problem.path not in seen:
            seen.add(problem.path)
            unique.append(problem)
    return unique


def _expand_env(value: Any, env: Mapping[str, str], path: str, problems: list[Problem]) -> Any:
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            from_file = env.get(f"{name}{FILE_SUFFIX}")
            if from_file:  # NAME_FILE: the value is that file's content (Docker secrets)
                if env.get(name):
                    problems.append(
                        Problem(path, f"both {name} and {name}{FILE_SUFFIX} are set; keep one")
                    )
                    return ""
                return _read_secret_file(name, from_file, path, problems)
            if name in env and (env[name] != "" or default is None):
                return env[name]
            if default is not None:
                return default
            problems.append(Problem(path, f"environment variable {name} is not set"))
            return ""

        return ENV_PATTERN.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, env, _join(path, str(k)), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, env, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return value


def _read_secret_file(name: str, file: str, path: str, problems: list[Problem]) -> str:
    """The content of `file` for `${name}`, less its final line break; never logged."""
    where = f"{name}{FILE_SUFFIX}={file}"
    try:
        with open(file, encoding="utf-8") as handle:
            value = handle.read(MAX_SECRET_FILE_BYTES + 1)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        problems.append(Problem(path, f"cannot read {where}: {reason}"))
        return ""
    if len(value) > MAX_SECRET_FILE_BYTES:
        problems.append(Problem(path, f"{where} is larger than {MAX_SECRET_FILE_BYTES} bytes"))
        return ""
    # `echo secret > file` and editors add a line break that is not part of the secret.
    value = value.removesuffix("\n").removesuffix("\r")
    if not value:
        problems.append(Problem(path, f"{where} is empty"))
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _convert(value: Any, tp: Any, path: str, problems: list[Problem]) -> Any:
    """Convert `value` to type `tp`, appending problems; returns a best-effort value."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], path, problems)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _convert_dataclass(value, tp, path, problems)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            problems.append(Problem(path, f"must be one of {', '.join(map(str, allowed))}"))
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = get_args(tp)
        if isinstance(value, str) and item_tp is str:
            value = [value]
        if not isinstance(value, list):
            problems.append(Problem(path, "must be a list"))
            return ()
        return tuple(_convert(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value))
    if origin is dict:
        _key_tp, item_tp = get_args(tp)
        if not isinstance(value, dict):
            problems.append(Problem(path, "must be a mapping"))
            return {}
        return {
            str(k): _convert(v, item_tp, _join(path, str(k)), problems) for k, v in value.items()
        }
    return _convert_scalar(value, tp, path, problems)


def _convert_scalar(value: Any, tp: Any, path: str, problems: list[Problem]) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(Problem(path, "must be true or false"))
        return False
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            problems.append(Problem(path, f"must be a number, got {_describe(value)}"))
            return tp(0)
        try:
            number = tp(value)
        except ValueError:
            problems.append(Problem(path, f"must be {'an integer' if tp is int else 'a number'}"))
            return tp(0)
        if tp is int and isinstance(value, float) and value != number:
            problems.append(Problem(path, "must be an integer"))
        if number < 0:
            problems.append(Problem(path, "must not be negative"))
        return number
    if tp is str or tp is Secret:
        if isinstance(value, bool | dict | list) or value is None:
            problems.append(Problem(path, f"must be a string, got {_describe(value)}"))
            return tp("")
        return tp(str(value))
    if tp is datetime:
        return _convert_datetime(value, path, problems)
    raise TypeError(f"no converter for {tp!r} at {path}")  # a programming error, not input


def _convert_datetime(value: Any, path: str, problems: list[Problem]) -> datetime | None:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            problems.append(Problem(path, "must be an ISO 8601 date-time"))
            return None
    else:
        problems.append(Problem(path, "must be an ISO 8601 date-time"))
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", bool: "a boolean"}.get(type(value), repr(value))


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _convert_dataclass(value: Any, cls: type, path: str, problems: list[Problem]) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append(Problem(path, f"must be a mapping, got {_describe(value)}"))
        return None
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, item in value.items():
        key_path = _join(path, str(key))
        if key not in fields:
            problems.append(Problem(key_path, f"unknown key{_did_you_mean(str(key), fields)}"))
            continue
        kwargs[key] = _convert(item, hints[key], key_path, problems)
    for name, f in fields.items():
        if name not in kwargs and f.metadata.get("required"):
            problems.append(Problem(_join(path, name), "is required"))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError):
        return None


def _did_you_mean(key: str, fields: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _resolve_paths(config: GatewayConfig, base: Path) -> GatewayConfig:
    """Relative file paths in the config are relative to the config file, not the cwd."""

    def fix(p: str | None) -> str | None:
        return str((base / p).resolve()) if p and not os.path.isabs(p) else p

    auth = dataclasses.replace(config.auth, htpasswd=fix(config.auth.htpasswd))
    if auth.jwt is not None:
        auth = dataclasses.replace(
            auth,
            jwt=dataclasses.replace(
                auth.jwt,
                public_key=fix(auth.jwt.public_key),
                private_key=fix(auth.jwt.private_key),
            ),
        )
    tls = config.tls
    if tls is not None:
        tls = dataclasses.replace(tls, cert=fix(tls.cert) or "", key=fix(tls.key) or "")
    return dataclasses.replace(config, auth=auth, tls=tls)


# --- semantic checks that need only the config itself -------------------------------------


def parse_host_port(text: str) -> tuple[str, int]:
    """`127.0.0.1:8080`, `[::1]:8080`, `:8080` -> (host, port); ValueError when malformed."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", text.strip())
    if not match:
        raise ValueError("must be HOST:PORT (IPv6 as [::1]:PORT)")
    host = match.group(1) or match.group(3) or "0.0.0.0"  # noqa: S104 - ':8080' means all
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ValueError("port must be 0-65535")
    return host, port


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_addresses(config: GatewayConfig) -> Iterable[Problem]:
    for key, value in (("listen", config.listen), ("metrics.listen", config.metrics.listen)):
        if value is None or (key == "metrics.listen" and not config.metrics.enabled):
            continue
        try:
            parse_host_port(value)
        except ValueError as exc:
            yield Problem(key, str(exc))
    for path, upstream in upstream_paths(config):
        if not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", upstream.url):
            yield Problem(f"{path}.url", "must be an http:// or https:// URL")
        for key in ("connect_timeout", "read_timeout", "first_byte_timeout"):
            value = getattr(upstream, key)
            if value is not None and value <= 0:
                yield Problem(f"{path}.{key}", "must be greater than 0")
    for i, cidr in enumerate(config.trusted_proxies):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            yield Problem(f"trusted_proxies[{i}]", f"{cidr!r} is not an address or CIDR")
    if config.max_body_bytes < 1024:
        yield Problem("max_body_bytes", "must be at least 1024")
    for key in ("client_idle_timeout", "client_body_timeout"):
        if getattr(config, key) <= 0:  # 0 would turn the bound off: slow clients unbounded
            yield Problem(key, "must be greater than 0")
    if config.tls is not None:
        for key in ("cert", "key"):
            file = getattr(config.tls, key)
            if not file:
                yield Problem(f"tls.{key}", "is required")
            elif not os.path.isfile(file):
                yield Problem(f"tls.{key}", f"file not found: {file}")
    if config.metrics.enabled and (
        not config.metrics.path.startswith("/") or config.metrics.path in ("/healthz", "/readyz")
    ):
        yield Problem("metrics.path", "must be a path starting with / (not /healthz or /readyz)")
    if config.rate_limits.store != "memory" and not re.match(
        r"(rediss?|unix)://", config.rate_limits.store
    ):
        yield Problem(
            "rate_limits.store", "must be `memory` or a redis://, rediss:// or unix:// URL"
        )


def upstream_paths(config: GatewayConfig) -> list[tuple[str, UpstreamConfig]]:
    """Each server's settings with the key path it was written under."""
    if config.upstreams is not None:
        return [(f"upstreams[{i}]", u) for i, u in enumerate(config.upstreams)]
    return [("upstream", config.upstream)]


def _check_roles(config: GatewayConfig) -> Iterable[Problem]:
    """Every role a user, key, route or metrics names must be declared under `roles`."""
    known = set(config.roles)

    def unknown(path: str, roles: Iterable[str]) -> Iterable[Problem]:
        for role in roles:
            if role not in known:
                yield Problem(path, f"unknown role {role!r} (declare it under `roles`)")

    for name, user in config.auth.users.items():
        yield from unknown(f"auth.users.{name}.roles", user.roles)
    # Each default below is checked only where its feature is on: a config that never
    # mentions htpasswd (or turns metrics off) must not fail over a key its author never wrote.
    if config.auth.htpasswd:
        yield from unknown("auth.htpasswd_roles", config.auth.htpasswd_roles)
    for i, key in enumerate(config.auth.api_keys):
        yield from unknown(f"auth.api_keys[{i}].roles", key.roles)
    metrics = config.metrics
    if metrics.enabled and not metrics.public and metrics.roles != DEFAULT_METRICS_ROLES:
        # The default `[admin]` without an `admin` role just means no role reads metrics
        # (fail closed); only roles the author wrote can be typos.
        yield from unknown("metrics.roles", metrics.roles)
    for i, rule in enumerate(config.routes or ()):
        yield from unknown(f"routes[{i}].roles", rule.roles or ())


def _check_routes(config: GatewayConfig) -> Iterable[Problem]:
    for i, rule in enumerate(config.routes or ()):
        path = f"routes[{i}]"
        if not rule.path.startswith("/"):
            yield Problem(f"{path}.path", "must start with /")
        bad = [m for m in rule.methods if m.upper() not in HTTP_METHODS and m != "*"]
        if bad:
            yield Problem(f"{path}.methods", f"unknown method(s): {', '.join(bad)}")
        kinds = [rule.public, rule.authenticated, rule.roles is not None, rule.deny]
        if sum(kinds) != 1:
            yield Problem(path, "needs exactly one of public, authenticated, roles, deny")


_BUILTIN_CHECKS: tuple[Check, ...] = (_check_addresses, _check_roles, _check_routes)


# Modules that own a concern register their checks when imported; imported last because
# they import `register_check` and `Problem` from here.
import gateway.auth.checks  # noqa: E402,F401  (auth: hashes, htpasswd, keys, jwt)
import gateway.limits.checks  # noqa: E402,F401  (limits: positive values, redis extra)
import gateway.policy.checks  # noqa: E402,F401  (policy: model globs, route paths, origins)
import gateway.scheduler.checks  # noqa: E402,F401  (fair queue: slots, caps, weights)
import gateway.upstreams.checks  # noqa: E402,F401  (several upstreams: names, model globs)
