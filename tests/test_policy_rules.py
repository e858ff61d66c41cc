"""Route table, model names and allow-lists (pure), with Principal objects directly."""

from __future__ import annotations

import pytest

from gateway.auth.principal import Principal
from gateway.config import RouteRule
from gateway.config_load import ConfigError, parse_config
from gateway.policy.models import ModelMatcher, is_cloud, models_for, normalise_model
from gateway.policy.policy import Policy
from gateway.policy.routes import BUILTIN_ROUTES, ROUTE_CLASSES, Access, RouteTable, classify_route
from tests.policy_support import HASH  # of "pw"

USER = Principal("alice", frozenset({"user"}), "basic")
ADMIN = Principal("root", frozenset({"admin"}), "basic")
STRANGER = Principal("eve", frozenset({"wizard"}), "jwt")  # a role the config never declared

BUILTIN = RouteTable(BUILTIN_ROUTES)


@pytest.mark.parametrize(
    ("method", "path", "anonymous", "user", "admin"),
    [
        ("GET", "/", Access.ALLOW, Access.ALLOW, Access.ALLOW),
        ("HEAD", "/", Access.ALLOW, Access.ALLOW, Access.ALLOW),
        ("GET", "/api/version", Access.ALLOW, Access.ALLOW, Access.ALLOW),
        ("POST", "/api/chat", Access.UNAUTHENTICATED, Access.ALLOW, Access.ALLOW),
        ("POST", "/api/generate", Access.UNAUTHENTICATED, Access.ALLOW, Access.ALLOW),
        ("POST", "/api/embed", Access.UNAUTHENTICATED, Access.ALLOW, Access.ALLOW),
        ("POST", "/api/embeddings", Access.UNAUTHENTICATED, Access.ALLOW, Access.ALLOW),
        ("POST", "/api/show", Access.UNAUTHENTICATED, Access.ALLOW, Access.ALLOW),
        ("GET", "/api/tags", Access.UNAUTHENTICATED, Access.ALLOW, Access.ALLOW),
        ("GET", "/api/ps", Access.UNAUTHENTICATED, Access.ALLOW, Access.ALLOW),
        ("POST", "/v1/chat/completions", Access.UNAUTHENTICATED, Access.ALLOW, Access.ALLOW),
        ("GET", "/v1/models", Access.UNAUTHENTICATED, Access.ALLOW, Access.ALLOW),
        ("GET", "/v1/models/llama3.2", Access.UNAUTHENTICATED, Access.ALLOW, Access.ALLOW),
        ("POST", "/api/pull", Access.UNAUTHENTICATED, Access.FORBIDDEN, Access.ALLOW),
        ("POST", "/api/push", Access.UNAUTHENTICATED, Access.FORBIDDEN, Access.ALLOW),
        ("POST", "/api/create", Access.UNAUTHENTICATED, Access.FORBIDDEN, Access.ALLOW),
        ("POST", "/api/copy", Access.UNAUTHENTICATED, Access.FORBIDDEN, Access.ALLOW),
        ("DELETE", "/api/delete", Access.UNAUTHENTICATED, Access.FORBIDDEN, Access.ALLOW),
        ("POST", "/api/blobs/sha256:ab", Access.UNAUTHENTICATED, Access.FORBIDDEN, Access.ALLOW),
        ("HEAD", "/api/blobs/sha256:ab", Access.UNAUTHENTICATED, Access.FORBIDDEN, Access.ALLOW),
        ("POST", "/api/me", Access.UNAUTHENTICATED, Access.FORBIDDEN, Access.ALLOW),
        ("POST", "/api/signout", Access.UNAUTHENTICATED, Access.FORBIDDEN, Access.ALLOW),
        (
            "POST",
            "/api/experimental/web_search",
            Access.UNAUTHENTICATED,
            Access.FORBIDDEN,
            Access.ALLOW,
        ),
        # Case and method: same decision whatever the spelling; unlisted methods refused.
        ("POST", "/API/PULL", Access.UNAUTHENTICATED, Access.FORBIDDEN, Access.ALLOW),
        ("GET", "/api/pull", Access.FORBIDDEN, Access.FORBIDDEN, Access.FORBIDDEN),
        ("DELETE", "/api/tags", Access.FORBIDDEN, Access.FORBIDDEN, Access.FORBIDDEN),
        ("POST", "/", Access.FORBIDDEN, Access.FORBIDDEN, Access.FORBIDDEN),
        # Unknown routes: 403 for everyone (credentials would not help).
        ("GET", "/no/such/route", Access.FORBIDDEN, Access.FORBIDDEN, Access.FORBIDDEN),
        ("GET", "/api/status", Access.FORBIDDEN, Access.FORBIDDEN, Access.FORBIDDEN),
        ("GET", "/v1", Access.FORBIDDEN, Access.FORBIDDEN, Access.FORBIDDEN),
        ("OPTIONS", "/api/chat", Access.FORBIDDEN, Access.FORBIDDEN, Access.FORBIDDEN),
    ],
)
def test_builtin_table(
    method: str, path: str, anonymous: Access, user: Access, admin: Access
) -> None:
    assert BUILTIN.decide(method, path, None) is anonymous
    assert BUILTIN.decide(method, path, USER) is user
    assert BUILTIN.decide(method, path, ADMIN) is admin
    assert BUILTIN.decide(method, path, STRANGER) in (user, Access.FORBIDDEN)


def test_first_match_wins_and_kinds() -> None:
    table = RouteTable(
        [
            RouteRule(path="/v1/embeddings", methods=("POST",), deny=True),
            RouteRule(path="/v1/*", methods=("*",), roles=("user",)),
            RouteRule(path="/open/*", methods=("GET",), public=True),
            RouteRule(path="/any", methods=("GET",), authenticated=True),
        ]
    )
    assert table.decide("POST", "/v1/embeddings", ADMIN) is Access.FORBIDDEN  # deny first
    assert table.decide("POST", "/v1/embeddings", None) is Access.FORBIDDEN
    assert table.decide("POST", "/v1/chat/completions", USER) is Access.ALLOW
    assert table.decide("PATCH", "/v1/x", USER) is Access.ALLOW  # "*" methods
    assert table.decide("POST", "/v1/chat/completions", ADMIN) is Access.FORBIDDEN
    assert table.decide("POST", "/v1/chat/completions", None) is Access.UNAUTHENTICATED
    assert table.decide("GET", "/open/a/b", None) is Access.ALLOW
    assert table.decide("GET", "/any", STRANGER) is Access.ALLOW
    assert table.decide("GET", "/anything", STRANGER) is Access.FORBIDDEN  # globs are exact
    assert table.decide("GET", "/v1", USER) is Access.FORBIDDEN  # `/v1/*` needs a segment


def test_rule_paths_compare_case_insensitively_and_without_trailing_slash() -> None:
    table = RouteTable([RouteRule(path="/API/Tags/", methods=("GET",), deny=True)])
    assert table.match("GET", "/api/tags") is not None
    assert table.match("get", "/api/TAGS") is not None


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/", "public"),
        ("/api/version", "public"),
        ("/api/chat", "inference"),
        ("/v1/audio/transcriptions", "inference"),
        ("/api/tags", "read"),
        ("/v1/models/x", "read"),
        ("/api/pull", "management"),
        ("/api/blobs/sha256:1", "management"),
        ("/api/me", "cloud"),
        ("/api/experimental/web_fetch", "cloud"),
        ("/whatever", "other"),
        ("/API/CHAT", "inference"),
    ],
)
def test_route_classes_are_a_fixed_set(path: str, label: str) -> None:
    assert classify_route(path)[0] == label
    assert label in ROUTE_CLASSES


@pytest.mark.parametrize(
    ("name", "normal"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("Llama3.2:LATEST", "llama3.2:latest"),
        ("library/llama3.2", "llama3.2:latest"),
        ("registry.ollama.ai/library/llama3.2:8b", "llama3.2:8b"),
        ("registry.ollama.ai/alice/m", "alice/m:latest"),
        ("alice/m:q4", "alice/m:q4"),
        ("localhost:5000/ns/m", "localhost:5000/ns/m:latest"),
        ("gpt-oss:120b-cloud", "gpt-oss:120b-cloud"),
    ],
)
def test_model_names_normalise_like_ollama(name: str, normal: str) -> None:
    assert normalise_model(name) == normal


@pytest.mark.parametrize(
    ("name", "cloud"),
    [
        ("gpt-oss:120b-cloud", True),
        ("gpt-oss:cloud", True),
        ("GPT-OSS:120B-CLOUD", True),
        ("gpt-oss:20b:cloud", True),
        ("kimi-k2:1t-cloud", True),
        ("cloudy:7b", False),
        ("my-cloud", False),
        ("llama3.2", False),
        ("ns/cloud-model:latest", False),
    ],
)
def test_cloud_detection_follows_ollama(name: str, cloud: bool) -> None:
    assert is_cloud(name) is cloud


@pytest.mark.parametrize(
    ("globs", "name", "allowed"),
    [
        (["*"], "llama3.2", True),
        (["*"], "alice/custom:q4", True),
        (["*"], "gpt-oss:120b-cloud", False),  # `*` alone never allows cloud models
        (["*", "*-cloud"], "gpt-oss:120b-cloud", True),
        (["*:cloud"], "gpt-oss:cloud", True),
        (["gpt-oss:120b-cloud"], "GPT-OSS:120b-cloud", True),
        (["gpt-oss:*"], "gpt-oss:120b-cloud", False),
        (["llama3.2"], "llama3.2", True),
        (["llama3.2"], "llama3.2:latest", True),
        (["llama3.2"], "library/llama3.2", True),
        (["llama3.2"], "llama3.2:8b", False),  # a literal without tag means :latest
        (["llama3.2:*"], "llama3.2:8b", True),
        (["llama3.2:*"], "llama3.2", True),
        (["llama3.2:*"], "llama3.20:1b", False),
        (["qwen*"], "qwen2.5:7b", True),
        (["Qwen2.5:7B"], "qwen2.5:7b", True),
        ([], "llama3.2", False),
        (["alice/*"], "alice/m", True),
        (["alice/*"], "bob/m", False),
    ],
)
def test_model_globs(globs: list[str], name: str, allowed: bool) -> None:
    assert ModelMatcher.build(globs).allows(name) is allowed


CONFIG = f"""
auth:
  users:
    alice: {{password: "{HASH}", roles: [user]}}
    bob: {{password: "{HASH}", roles: [user, ops], models: ["qwen*"]}}
    carol: {{password: "{HASH}", roles: [user, ops]}}
roles:
  user: {{models: ["llama3.2:*", "all-minilm"]}}
  ops: {{models: ["qwen*", "llama3.2:*"]}}
  admin: {{models: ["*"]}}
"""


def test_models_for_union_override_and_unknown_roles() -> None:
    config = parse_config(CONFIG)
    alice = Principal("alice", frozenset({"user"}), "basic")
    assert models_for(alice, config) == ("llama3.2:*", "all-minilm")
    carol = Principal("carol", frozenset({"user", "ops"}), "basic")
    assert set(models_for(carol, config)) == {"llama3.2:*", "all-minilm", "qwen*"}
    bob = Principal("bob", frozenset({"user", "ops"}), "basic")
    assert models_for(bob, config) == ("qwen*",)  # the user's own list replaces the roles'
    # A key or token acting as a configured user gets that user's override too.
    assert models_for(Principal("bob", frozenset({"admin"}), "api_key", "k"), config) == ("qwen*",)
    assert models_for(STRANGER, config) == ()
    assert models_for(None, config) == ("*",)  # anonymous on a public rule: local models
    anonymous = parse_config(CONFIG + "  anonymous: {models: [all-minilm]}\n")
    assert models_for(None, anonymous) == ("all-minilm",)


def test_policy_open_mode_only_without_credentials_and_routes() -> None:
    assert Policy.from_config(parse_config("")).open
    assert not Policy.from_config(parse_config(CONFIG)).open
    explicit = parse_config("routes: [{path: /, methods: [GET], public: true}]")
    policy = Policy.from_config(explicit)
    assert not policy.open
    assert policy.route_access("POST", "/api/chat", None) is Access.FORBIDDEN


def test_gateway_endpoints_and_metrics_access() -> None:
    policy = Policy.from_config(parse_config(CONFIG))
    for path in ("/healthz", "/readyz"):
        assert policy.route_access("GET", path, None) is Access.ALLOW
        assert policy.classify_route(path)[0] == "gateway"
    assert policy.route_access("GET", "/metrics", None) is Access.UNAUTHENTICATED
    assert policy.route_access("GET", "/metrics", USER) is Access.FORBIDDEN
    assert policy.route_access("GET", "/metrics", ADMIN) is Access.ALLOW
    public = Policy.from_config(parse_config(CONFIG + "metrics: {public: true, path: /m}\n"))
    assert public.route_access("GET", "/m", None) is Access.ALLOW
    assert public.classify_route("/m") == ("gateway", "/metrics")


def test_policy_caches_matchers_per_glob_list() -> None:
    policy = Policy.from_config(parse_config(CONFIG))
    alice = Principal("alice", frozenset({"user"}), "basic")
    assert policy.matcher(alice) is policy.matcher(Principal("x", frozenset({"user"}), "jwt"))
    assert policy.may_use(alice, "llama3.2:1b")
    assert not policy.may_use(alice, "qwen2.5")


@pytest.mark.parametrize(
    ("snippet", "problem"),
    [
        ("roles: {user: {models: ['llama 3']}}", "roles.user.models[0]"),
        (
            f"auth: {{users: {{a: {{password: '{HASH}', models: ['m;x']}}}}}}",
            "auth.users.a.models[0]",
        ),
        ("routes: [{path: /api/pull/, public: true}]", None),
        ("routes: [{path: //api/pull, public: true}]", "routes[0].path"),
        ("routes: [{path: /api/%70ull, public: true}]", "routes[0].path"),
        ("routes: [{path: /api/../pull, public: true}]", "routes[0].path"),
        ("cors: {origins: ['https://app.example', '*', 'https://*.example.org']}", None),
        ("cors: {origins: ['app.example']}", "cors.origins[0]"),
    ],
)
def test_config_checks(snippet: str, problem: str | None) -> None:
    if problem is None:
        parse_config(snippet)
        return
    with pytest.raises(ConfigError) as caught:
        parse_config(snippet)
    assert problem in [p.path for p in caught.value.problems]
