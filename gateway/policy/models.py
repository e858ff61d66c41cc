"""Model names and allow-lists: Ollama's name rules, globs, cloud models. Pure logic.

Names compare as Ollama compares them: case-insensitively, with the default registry
(`registry.ollama.ai/`) and namespace (`library/`) implied, and `:latest` when no tag is
given. So `Llama3.2`, `library/llama3.2` and `llama3.2:latest` are one model.

Globs (see docs/policy.md):
- a literal without a tag means `:latest` (`llama3.2` allows `llama3.2:latest` only);
- `*` matches any run of characters, `:` and `/` included (`llama3.2:*`, `qwen*`, `*`);
- cloud models (tag `cloud` or ending in `-cloud`, Ollama's own rule) are proxied to
  ollama.com under the server's identity: only a glob that itself contains "cloud"
  can allow them, so `*` alone never does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.auth.principal import Principal
from gateway.config import GatewayConfig

DEFAULT_REGISTRY = "registry.ollama.ai/"
DEFAULT_NAMESPACE = "library/"
MAX_MODEL_LENGTH = 512
# Characters Ollama names can hold ([host[:port]/][namespace/]model[:tag][@digest]).
# Anything else (spaces Ollama would trim, controls, quotes) is refused with 400, so the
# name checked is the name Ollama resolves.
_NAME_CHARS = re.compile(r"[A-Za-z0-9._:/@+-]+")
GLOB_CHARS = re.compile(r"[A-Za-z0-9._:/@+*-]+")
ANONYMOUS_ROLE = "anonymous"


class ModelNameError(ValueError):
    """Not something Ollama would accept as a model name (answered with 400)."""


def check_model_name(name: str) -> None:
    if len(name) > MAX_MODEL_LENGTH or not _NAME_CHARS.fullmatch(name):
        raise ModelNameError("invalid model name")


def normalise_model(name: str) -> str:
    """Ollama's short display form: lower-case, default registry/namespace dropped, a tag."""
    lowered = name.lower()
    base, at, digest = lowered.partition("@")
    base = base.removeprefix(DEFAULT_REGISTRY)
    if base.startswith(DEFAULT_NAMESPACE) and base.count("/") == 1:
        base = base.removeprefix(DEFAULT_NAMESPACE)
    if base and ":" not in base.rsplit("/", 1)[-1]:
        base += ":latest"
    return base + at + digest


def is_cloud(name: str) -> bool:
    """Ollama's rule (modelref.parseSourceSuffix): last `:` suffix `cloud` or `*-cloud`."""
    base = name.lower().partition("@")[0]
    _, colon, suffix = base.rpartition(":")
    if not colon:
        return False
    suffix = suffix.strip()
    return suffix == "cloud" or ("/" not in suffix and suffix.endswith("-cloud"))


def normalise_glob(pattern: str) -> str:
    """A glob in the form names are compared in (see the module docstring)."""
    lowered = pattern.lower()
    lowered = lowered.removeprefix(DEFAULT_REGISTRY)
    if lowered.startswith(DEFAULT_NAMESPACE) and lowered.count("/") == 1:
        lowered = lowered.removeprefix(DEFAULT_NAMESPACE)
    if "*" not in lowered and "@" not in lowered and ":" not in lowered.rsplit("/", 1)[-1]:
        lowered += ":latest"
    return lowered


def compile_glob(pattern: str) -> re.Pattern[str]:
    """One model glob (normalised like names) as a full-match pattern."""
    return re.compile(
        ".*".join(re.escape(piece) for piece in normalise_glob(pattern).split("*")), re.DOTALL
    )


def _compile(patterns: Iterable[str]) -> re.Pattern[str] | None:
    parts = [
        ".*".join(re.escape(piece) for piece in normalise_glob(p).split("*")) for p in patterns
    ]
    return re.compile("|".join(f"(?:{p})" for p in parts), re.DOTALL) if parts else None


@dataclass(frozen=True, slots=True)
class ModelMatcher:
    """A compiled allow-list: all globs for local models, "cloud" globs for cloud ones."""

    local: re.Pattern[str] | None
    cloud: re.Pattern[str] | None

    @classmethod
    def build(cls, globs: Iterable[str]) -> ModelMatcher:
        globs = tuple(globs)
        return cls(
            local=_compile(globs),
            # Defends against `*` silently granting models that run on ollama.com.
            cloud=_compile(g for g in globs if "cloud" in g.lower()),
        )

    def allows(self, name: str) -> bool:
        pattern = self.cloud if is_cloud(name) else self.local
        return pattern is not None and pattern.fullmatch(normalise_model(name)) is not None


def models_for(principal: Principal | None, config: GatewayConfig) -> tuple[str, ...]:
    """The model globs a caller may use.

    A principal gets the union of its roles' globs (roles the config does not declare,
    e.g. from a JWT, give nothing), replaced by its user entry's `models` when set. An
    anonymous caller (it only gets this far on a `public` rule) gets the `anonymous` role's
    globs when that role is declared, else every local model.
    """
    if principal is None:
        role = config.roles.get(ANONYMOUS_ROLE)
        return role.models if role is not None else ("*",)
    user = config.auth.users.get(principal.user)
    if user is not None and user.models is not None:
        return user.models
    globs: list[str] = []
    for name in sorted(principal.roles):
        role = config.roles.get(name)
        if role is not None:
            globs.extend(g for g in role.models if g not in globs)
    return tuple(globs)
