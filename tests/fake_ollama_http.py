"""HTTP-level helpers for the fake Ollama: request records, gin-like binding, Host/CORS rules.

Split out of ``tests/fake_ollama.py`` to keep each file readable; nothing here holds state.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import ipaddress
import json
import re
import socket
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import CIMultiDict

from tests.fake_ollama_wire import JSON_CT, anthropic_error, go_json, openai_error

if TYPE_CHECKING:
    from tests.fake_ollama_slots import Grant

KEEP_BODY_MAX = 1 << 20  # RecordedRequest.body is kept only up to 1 MiB
DIGEST_RE = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")
CORS_ALLOW_HEADERS = (
    "Authorization,Content-Type,User-Agent,Accept,X-Requested-With,Openai-Beta,X-Stainless-Arch,"
    "X-Stainless-Async,X-Stainless-Custom-Poll-Interval,X-Stainless-Helper-Method,X-Stainless-Lang,"
    "X-Stainless-Os,X-Stainless-Package-Version,X-Stainless-Poll-Helper,X-Stainless-Retry-Count,"
    "X-Stainless-Runtime,X-Stainless-Runtime-Version,X-Stainless-Timeout"
)
_BUILTIN_ORIGINS = {
    f"{s}://{h}" for s in ("http", "https") for h in ("localhost", "127.0.0.1", "0.0.0.0")
}
_ORIGIN_PREFIXES = tuple(f"{o}:" for o in _BUILTIN_ORIGINS) + (
    "app://",
    "file://",
    "tauri://",
    "vscode-webview://",
    "vscode-file://",
)
_GO_PRIVATE = [
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
]


@dataclass
class RecordedRequest:
    """One request as the fake received it (appended on arrival; body fields filled when read)."""

    method: str
    path: str  # raw path as received, without the query
    query: str  # raw query string
    headers: CIMultiDict[str]
    body_size: int = 0
    body_sha256: str = ""
    body: bytes | None = None  # kept only when body_size <= 1 MiB
    json: Any | None = None  # parsed body when it was JSON
    client_gone: bool = False  # the client disconnected before the response finished
    body_read: bool = (
        False  # the fake consumed the body (False e.g. for a POST to an existing blob)
    )
    status: int | None = None  # status the fake answered with (None if it never answered)


@dataclass
class Model:
    name: str
    modified: float
    size: int
    digest: str  # hex, no prefix (as in /api/tags)
    family: str
    parameter_size: str
    quantization: str
    capabilities: list[str]
    remote: bool

    @classmethod
    def make(cls, name: str, modified: float) -> Model:
        low = name.lower()
        digest = hashlib.sha256(low.encode()).hexdigest()
        remote = low.endswith(":cloud") or low.endswith("-cloud")
        if "minilm" in low or "embed" in low:
            return cls(
                name, modified, 45_960_996, digest, "bert", "23M", "F16", ["embedding"], remote
            )
        if "qwen" in low:
            return cls(
                name,
                modified,
                4_683_087_332,
                digest,
                "qwen2",
                "7.6B",
                "Q4_K_M",
                ["completion", "tools"],
                remote,
            )
        size = 384 if remote else 2_019_393_189
        return cls(
            name, modified, size, digest, "llama", "3.2B", "Q4_K_M", ["completion", "tools"], remote
        )

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization,
        }


def norm(name: str) -> str:
    """Ollama's case-insensitive name match: default tag ``latest``, namespace ``library``."""
    n = name.strip().lower()
    parts = n.split("/")
    if len(parts) == 3 and parts[0] == "registry.ollama.ai":
        parts = parts[1:]
    if len(parts) == 2 and parts[0] == "library":
        parts = parts[1:]
    if ":" not in parts[-1]:
        parts[-1] += ":latest"
    return "/".join(parts)


def with_tag(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def go_split_host(host: str) -> str:
    """net.SplitHostPort, falling back to the whole value on error (allowedHostsMiddleware)."""
    if host.startswith("["):
        end = host.find("]")
        if end != -1 and host[end + 1 : end + 2] == ":":
            return host[1:end]
        return host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


class Abort(Exception):
    """Early return from a handler with a ready response."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response


def reply(status: int, ctype: str | None, body: bytes = b"") -> web.Response:
    headers = {"Content-Type": ctype} if ctype else None
    return web.Response(status=status, body=body, headers=headers)


def json_reply(obj: Any, status: int = 200) -> web.Response:
    """gin c.JSON: charset content type, no trailing newline."""
    return reply(status, JSON_CT, go_json(obj))


def err(status: int, message: str) -> Abort:
    return Abort(json_reply({"error": message}, status))


GO_KIND = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "bool",
    int: "number",
    float: "number",
}
GO_TYPE = {
    "string": "string",
    "bool": "bool",
    "number": "int",
    "object": "map[string]interface {}",
    "array": "[]interface {}",
}


@dataclass
class Ctx:
    """Per-request state handed to every route handler."""

    request: web.Request
    rec: RecordedRequest
    data: bytes = b""
    param: str = ""
    resp: web.StreamResponse | None = None
    server_aborted: bool = False
    seq: int = 0  # arrival number at the fake
    grant: Grant | None = None  # the model slot this request holds (released when it ends)

    def bind(self, struct: str, types: dict[str, str], style: str = "native") -> dict[str, Any]:
        """gin ShouldBindJSON: EOF on an empty body, Go decoder messages, field type checks."""
        text = self.data.decode("utf-8", "replace").lstrip()
        if not text:
            msg = "missing request body" if style == "native" else "EOF"
            raise self._bind_error(style, msg)
        try:
            # json.Decoder.Decode reads one value, so trailing bytes are ignored
            obj, _ = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError as e:
            at_end = e.pos >= len(text.rstrip())
            msg = (
                "unexpected EOF"
                if at_end
                else f"invalid character '{text[e.pos]}' looking for beginning of value"
            )
            raise self._bind_error(style, msg) from None
        if obj is None:
            return {}
        if not isinstance(obj, dict):
            kind = GO_KIND.get(type(obj), "number")
            raise self._bind_error(
                style, f"json: cannot unmarshal {kind} into Go value of type {struct}"
            )
        for name, want in types.items():
            v = obj.get(name)
            if v is None or GO_KIND.get(type(v)) == want:
                continue
            got = GO_KIND.get(type(v), "number")
            field = f"{struct.split('.')[-1]}.{name}"
            raise self._bind_error(
                style,
                f"json: cannot unmarshal {got} into Go struct field {field}"
                f" of type {GO_TYPE[want]}",
            )
        return obj

    @staticmethod
    def _bind_error(style: str, msg: str) -> Abort:
        if style == "openai":
            return Abort(json_reply(openai_error(400, msg), 400))
        if style == "anthropic":
            return Abort(json_reply(anthropic_error(400, msg), 400))
        return err(400, msg)


Handler = Callable[[Ctx], Awaitable[web.StreamResponse]]


def origin_allowed(origin: str, extra: list[str]) -> bool:
    """gin-contrib/cors: Ollama's built-in origins plus ``extra`` (OLLAMA_ORIGINS, wildcards)."""
    for o in extra:
        if o == "*" or o == origin:
            return True
        if "*" in o:
            pre, _, suf = o.partition("*")
            if (
                origin.startswith(pre)
                and origin.endswith(suf)
                and len(origin) >= len(pre) + len(suf)
            ):
                return True
    return origin in _BUILTIN_ORIGINS or origin.startswith(_ORIGIN_PREFIXES)


def host_allowed(host_header: str) -> tuple[bool, bool]:
    """allowedHostsMiddleware: (allowed, matched as a name rather than an IP literal)."""
    host = go_split_host(host_header)
    with suppress(ValueError):
        ip = ipaddress.ip_address(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if (
            ip.is_loopback
            or ip.is_unspecified
            or any(ip in n for n in _GO_PRIVATE if n.version == ip.version)
        ):
            return True, False
    h = host.lower()
    named = h in ("", "localhost", socket.gethostname().lower()) or h.endswith(
        (".localhost", ".local", ".internal")
    )
    return named, named


def preflight(origin: str) -> web.Response:
    """gin-contrib/cors answer to an allowed OPTIONS preflight."""
    resp = reply(204, None)
    resp.headers["Access-Control-Allow-Origin"] = origin
    resp.headers["Access-Control-Allow-Methods"] = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
    resp.headers["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS
    resp.headers["Access-Control-Max-Age"] = "43200"
    for v in ("Origin", "Access-Control-Request-Method", "Access-Control-Request-Headers"):
        resp.headers.add("Vary", v)
    return resp


def estimate_tokens(req: dict[str, Any]) -> int:
    """anthropic.EstimateInputTokens: characters / 4, at least 1."""

    def count(content: Any) -> int:
        if isinstance(content, str):
            return len(content)
        if isinstance(content, list):
            return sum(len(b.get("text") or "") for b in content if isinstance(b, dict))
        return 0

    total = count(req.get("system"))
    for m in req.get("messages") or []:
        if isinstance(m, dict):
            total += len(m.get("role") or "") + count(m.get("content"))
    return max(total // 4, 1)


def estimate_prompt_tokens(req: dict[str, Any]) -> int:
    """Prompt tokens from the prompt's size (characters / 4, at least 1), for any route.

    Counts ``prompt``, ``system``, ``instructions``, ``input`` (string, list of strings or
    items) and every message's role and content.
    """

    def count(content: Any) -> int:
        if isinstance(content, str):
            return len(content)
        if isinstance(content, list):
            return sum(count(c) for c in content)
        if isinstance(content, dict):
            return len(content.get("role") or "") + sum(
                count(content.get(k)) for k in ("content", "text")
            )
        return 0

    total = sum(count(req.get(k)) for k in ("prompt", "system", "instructions", "input"))
    total += count(req.get("messages"))
    return max(total // 4, 1)


def parse_multipart(ctype: str, data: bytes) -> tuple[dict[str, str], dict[str, bytes]]:
    """Form fields and file parts of a multipart/form-data body."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + data
    )
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    if not msg.is_multipart():
        return fields, files
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        raw = part.get_payload(decode=True)
        payload = raw if isinstance(raw, bytes) else b""
        if part.get_filename() is not None:
            files[name] = payload
        else:
            fields[name] = payload.decode("utf-8", "replace")
    return fields, files
