"""Principal: who is calling, as every later stage sees it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AuthMethod = Literal["basic", "api_key", "jwt"]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `credential_id` names the key or token subject, never a secret."""

    user: str
    roles: frozenset[str]
    method: AuthMethod
    credential_id: str | None = None
