"""One typed configuration, built once from a YAML file and CLI flags, validated, then handed down.

`check-config` runs exactly `load_config`, so an operator sees the same messages the server would give.
Messages name the key path (`backends[2].url: not an http(s) URL`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8188
POLICIES = ("least_loaded", "round_robin", "random", "least_connections")


class ConfigError(ValueError):
    """A configuration that cannot run; `problems` holds one message per bad key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class BackendConfig:
    name: str
    url: str
    max_inflight: int = 2
    weight: float = 1.0
    labels: tuple[str, ...] = ()
    min_vram_free_mb: int = 0    # below this much free VRAM (as polled) the backend takes no new prompt


@dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_body_mb: int = 100
    header_timeout_s: float = 60.0   # an idle connection, or one still sending its request headers, is closed
    body_timeout_s: float = 30.0     # a request body must end or bring 64 KiB within each such window (408)
    public_url: str | None = None    # how clients reach the proxy (behind an ingress, maybe under a path prefix)


@dataclass(frozen=True)
class StoreConfig:
    redis_url: str | None = None
    key_prefix: str = "comfy-proxy"
    finished_ttl_s: int = 7 * 24 * 3600


@dataclass(frozen=True)
class UploadsConfig:
    dir: str | None = None   # None: a temporary folder for this process (fine for one replica)


@dataclass(frozen=True)
class WorkflowsConfig:
    dir: str | None = None   # a folder of workflow templates (proxy.workflows); None: the routes list nothing


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = "least_loaded"
    poll_interval_s: float = 1.0
    backend_timeout_s: float = 5.0
    failover_after_s: float = 5.0   # a backend unreachable this long gives its prompts back (proxy.dispatch)
    retry_max_attempts: int = 1     # times a prompt that was running on a dead backend is run again
    idle_tenant_credit: float = 8.0  # prompts a tenant back from idle may queue ahead of backlogged ones


@dataclass(frozen=True)
class HealthConfig:
    """Circuit breaker and outlier ejection per backend (proxy.health)."""

    failure_threshold: int = 3         # consecutive failed requests that open a backend's circuit
    open_s: float = 1.0                # first wait before the half-open probe; doubles per re-open
    open_max_s: float = 60.0           # cap of that wait
    outlier_errors: int = 5            # consecutive execution_errors that eject a backend (0: never)
    ejection_s: float = 30.0           # first ejection; doubles per ejection
    ejection_max_s: float = 300.0      # cap of an ejection
    max_ejected_fraction: float = 0.5  # of the farm, rounded down, ejected at once at most


@dataclass(frozen=True)
class Quota:
    """Per-tenant limits; None means unlimited."""

    max_queued: int | None = None            # queued in the proxy + at backends + running
    per_minute: int | None = None            # prompts admitted per calendar minute
    per_day: int | None = None               # prompts admitted per UTC day
    gpu_seconds_per_day: float | None = None  # execution time (execution_start → end) per UTC day


@dataclass(frozen=True)
class TenantConfig:
    name: str
    api_keys: tuple[str, ...] = ()   # plain keys, or "sha256:<hex>" digests of keys
    role: str = "user"               # user | admin
    quota: Quota = field(default_factory=Quota)
    pools: tuple[str, ...] = ()      # backend labels this tenant may use; empty = all
    weight: float = 1.0              # share of the farm when it is saturated (fair queueing)

    @property
    def admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class AuthConfig:
    required: bool = False
    trust_comfy_user_header: bool = False
    metrics_token: str | None = None


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    backends: tuple[BackendConfig, ...] = ()
    store: StoreConfig = field(default_factory=StoreConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tenants: tuple[TenantConfig, ...] = ()
    uploads: UploadsConfig = field(default_factory=UploadsConfig)
    workflows: WorkflowsConfig = field(default_factory=WorkflowsConfig)


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate_env(text: str, env: dict[str, str] | None = None) -> str:
    """Replace `${NAME}` and `${NAME:-default}`; an unset name without default is an error."""
    env = dict(os.environ) if env is None else env
    missing: list[str] = []

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        missing.append(name)
        return ""

    out = _ENV_RE.sub(sub, text)
    if missing:
        raise ConfigError([f"${{{name}}}: environment variable is not set" for name in missing])
    return out


class _Reader:
    """Walks the raw YAML mapping, collecting every problem with its key path instead of stopping at one."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def section(self, raw: Any, path: str, known: set[str]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problems.append(f"{path}: must be a mapping")
            return {}
        for key in raw:
            if key not in known:
                self.problems.append(f"{path}.{key}: unknown key" if path else f"{key}: unknown key")
        return raw

    def value(self, raw: dict[str, Any], key: str, path: str, kind: type, default: Any,
              check: Any = None, why: str = "") -> Any:
        if key not in raw or raw[key] is None:
            return default
        val = raw[key]
        where = f"{path}.{key}" if path else key
        if kind is float and isinstance(val, int) and not isinstance(val, bool):
            val = float(val)
        if not isinstance(val, kind) or (kind is int and isinstance(val, bool)):
            self.problems.append(f"{where}: must be {kind.__name__}, got {type(val).__name__}")
            return default
        if check is not None and not check(val):
            self.problems.append(f"{where}: {why}")
            return default
        return val


def _valid_url(url: str, schemes: tuple[str, ...]) -> bool:
    parsed = urlparse(url)
    where = parsed.path if parsed.scheme == "unix" else parsed.netloc   # unix:///run/redis.sock
    return parsed.scheme in schemes and bool(where)


def _read_backends(r: _Reader, raw: Any) -> tuple[BackendConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.problems.append("backends: must be a list")
        return ()
    out: list[BackendConfig] = []
    names: set[str] = set()
    for i, item in enumerate(raw):
        path = f"backends[{i}]"
        if isinstance(item, str):
            item = {"url": item}
        sec = r.section(item, path, {"name", "url", "max_inflight", "weight", "labels", "min_vram_free_mb"})
        url = r.value(sec, "url", path, str, None, lambda u: _valid_url(u, ("http", "https")),
                      "not an http(s) URL")
        if url is None:
            if "url" not in sec:
                r.problems.append(f"{path}.url: required")
            continue
        url = url.rstrip("/")
        name = r.value(sec, "name", path, str, None, lambda n: bool(re.fullmatch(r"[A-Za-z0-9_.-]+", n)),
                       "use letters, digits, '.', '_' or '-'") or _name_from_url(url)
        if name in names:
            r.problems.append(f"{path}.name: duplicate backend name {name!r}")
        names.add(name)
        labels = sec.get("labels") or []
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            r.problems.append(f"{path}.labels: must be a list of strings")
            labels = []
        out.append(BackendConfig(
            name=name,
            url=url,
            max_inflight=r.value(sec, "max_inflight", path, int, 2, lambda n: 1 <= n <= 1024, "must be 1..1024"),
            weight=r.value(sec, "weight", path, float, 1.0, lambda w: w > 0, "must be > 0"),
            labels=tuple(labels),
            min_vram_free_mb=r.value(sec, "min_vram_free_mb", path, int, 0, lambda n: n >= 0, "must be >= 0"),
        ))
    return tuple(out)


def _read_tenants(r: _Reader, raw: Any) -> tuple[TenantConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.problems.append("tenants: must be a list")
        return ()
    out: list[TenantConfig] = []
    names: set[str] = set()
    keys: set[str] = set()
    for i, item in enumerate(raw):
        path = f"tenants[{i}]"
        sec = r.section(item, path, {"name", "api_keys", "role", "quota", "pools", "weight"})
        name = r.value(sec, "name", path, str, None, lambda n: bool(re.fullmatch(r"[A-Za-z0-9_.@-]+", n)),
                       "use letters, digits, '.', '_', '@' or '-'")
        if name is None:
            if "name" not in sec:
                r.problems.append(f"{path}.name: required")
            continue
        if name in names:
            r.problems.append(f"{path}.name: duplicate tenant {name!r}")
        names.add(name)
        api_keys = sec.get("api_keys") or []
        if not isinstance(api_keys, list) or not all(isinstance(k, str) and k for k in api_keys):
            r.problems.append(f"{path}.api_keys: must be a list of non-empty strings")
            api_keys = []
        for j, key in enumerate(api_keys):
            if key.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-f]{64}", key):
                r.problems.append(f"{path}.api_keys[{j}]: sha256: must be followed by 64 lowercase hex digits")
            if key in keys:
                r.problems.append(f"{path}.api_keys[{j}]: key used by another tenant")
            keys.add(key)
        q = r.section(sec.get("quota"), f"{path}.quota", {"max_queued", "per_minute", "per_day",
                                                          "gpu_seconds_per_day"})
        positive = (lambda n: n > 0, "must be > 0")
        quota = Quota(
            max_queued=r.value(q, "max_queued", f"{path}.quota", int, None, *positive),
            per_minute=r.value(q, "per_minute", f"{path}.quota", int, None, *positive),
            per_day=r.value(q, "per_day", f"{path}.quota", int, None, *positive),
            gpu_seconds_per_day=r.value(q, "gpu_seconds_per_day", f"{path}.quota", float, None, *positive),
        )
        pools = sec.get("pools") or []
        if not isinstance(pools, list) or not all(isinstance(p, str) for p in pools):
            r.problems.append(f"{path}.pools: must be a list of backend labels")
            pools = []
        out.append(TenantConfig(
            name=name, api_keys=tuple(api_keys), quota=quota, pools=tuple(pools),
            role=r.value(sec, "role", path, str, "user", lambda v: v in ("user", "admin"), "must be user or admin"),
            weight=r.value(sec, "weight", path, float, 1.0, *positive),
        ))
    return tuple(out)


def _read_health(r: _Reader, raw: Any) -> HealthConfig:
    sec = r.section(raw, "health", set(HealthConfig.__dataclass_fields__))
    d = HealthConfig()
    positive = (lambda n: n > 0, "must be > 0")
    out = HealthConfig(
        failure_threshold=r.value(sec, "failure_threshold", "health", int, d.failure_threshold, *positive),
        open_s=r.value(sec, "open_s", "health", float, d.open_s, *positive),
        open_max_s=r.value(sec, "open_max_s", "health", float, d.open_max_s, *positive),
        outlier_errors=r.value(sec, "outlier_errors", "health", int, d.outlier_errors, lambda n: n >= 0,
                               "must be >= 0"),
        ejection_s=r.value(sec, "ejection_s", "health", float, d.ejection_s, *positive),
        ejection_max_s=r.value(sec, "ejection_max_s", "health", float, d.ejection_max_s, *positive),
        max_ejected_fraction=r.value(sec, "max_ejected_fraction", "health", float, d.max_ejected_fraction,
                                     lambda f: 0 <= f < 1, "must be at least 0 and below 1"),
    )
    if out.open_max_s < out.open_s:
        r.problems.append("health.open_max_s: must be >= health.open_s")
    if out.ejection_max_s < out.ejection_s:
        r.problems.append("health.ejection_max_s: must be >= health.ejection_s")
    return out


def _name_from_url(url: str) -> str:
    parsed = urlparse(url)
    return re.sub(r"[^A-Za-z0-9_.-]", "-", parsed.netloc)


def parse_config(raw: Any) -> Config:
    """Turn a parsed YAML document into a `Config`, or raise `ConfigError` listing every bad key."""
    r = _Reader()
    top = r.section(raw, "", {"server", "backends", "store", "redis", "scheduler", "auth", "tenants", "uploads",
                                  "workflows", "health"})
    wf = r.section(top.get("workflows"), "workflows", {"dir"})
    workflows = WorkflowsConfig(dir=r.value(wf, "dir", "workflows", str, None))
    if workflows.dir is not None:
        from proxy.workflows import TemplateError, load_templates
        try:
            load_templates(workflows.dir)
        except (TemplateError, OSError) as exc:
            r.problems.append(f"workflows.dir: {exc}")
    up = r.section(top.get("uploads"), "uploads", {"dir"})
    uploads = UploadsConfig(dir=r.value(up, "dir", "uploads", str, None))
    srv = r.section(top.get("server"), "server", {"host", "port", "max_body_mb", "header_timeout_s",
                                                  "body_timeout_s", "public_url"})
    server = ServerConfig(
        host=r.value(srv, "host", "server", str, DEFAULT_HOST),
        port=r.value(srv, "port", "server", int, DEFAULT_PORT, lambda p: 0 <= p <= 65535, "not a port"),
        max_body_mb=r.value(srv, "max_body_mb", "server", int, 100, lambda n: n > 0, "must be > 0"),
        header_timeout_s=r.value(srv, "header_timeout_s", "server", float, 60.0, lambda n: n > 0, "must be > 0"),
        body_timeout_s=r.value(srv, "body_timeout_s", "server", float, 30.0, lambda n: n > 0, "must be > 0"),
        public_url=r.value(srv, "public_url", "server", str, None, lambda u: _valid_url(u, ("http", "https")),
                           "not an http(s) URL"),
    )
    st = r.section(top.get("store"), "store", {"key_prefix", "finished_ttl_s"})
    red = r.section(top.get("redis"), "redis", {"url"})
    store = StoreConfig(
        redis_url=r.value(red, "url", "redis", str, None,
                          lambda u: _valid_url(u, ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")),
                          "not a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL"),
        key_prefix=r.value(st, "key_prefix", "store", str, "comfy-proxy",
                           lambda p: bool(re.fullmatch(r"[A-Za-z0-9_.:-]+", p)), "use letters, digits, '.:_-'"),
        finished_ttl_s=r.value(st, "finished_ttl_s", "store", int, 7 * 24 * 3600, lambda n: n > 0, "must be > 0"),
    )
    sch = r.section(top.get("scheduler"), "scheduler", {"policy", "poll_interval_s", "backend_timeout_s",
                                                        "failover_after_s", "retry_max_attempts",
                                                        "idle_tenant_credit"})
    scheduler = SchedulerConfig(
        policy=r.value(sch, "policy", "scheduler", str, "least_loaded", lambda p: p in POLICIES,
                       f"must be one of {', '.join(POLICIES)}"),
        poll_interval_s=r.value(sch, "poll_interval_s", "scheduler", float, 1.0, lambda s: s > 0, "must be > 0"),
        backend_timeout_s=r.value(sch, "backend_timeout_s", "scheduler", float, 5.0, lambda s: s > 0,
                                  "must be > 0"),
        failover_after_s=r.value(sch, "failover_after_s", "scheduler", float, 5.0, lambda s: s > 0, "must be > 0"),
        retry_max_attempts=r.value(sch, "retry_max_attempts", "scheduler", int, 1, lambda n: 0 <= n <= 10,
                                   "must be 0..10"),
        idle_tenant_credit=r.value(sch, "idle_tenant_credit", "scheduler", float, 8.0, lambda n: 0 <= n <= 1000,
                                   "must be 0..1000"),
    )
    health = _read_health(r, top.get("health"))
    backends = _read_backends(r, top.get("backends"))
    tenants = _read_tenants(r, top.get("tenants"))
    au = r.section(top.get("auth"), "auth", {"required", "trust_comfy_user_header", "metrics_token"})
    auth = AuthConfig(
        required=r.value(au, "required", "auth", bool, bool(tenants)),
        trust_comfy_user_header=r.value(au, "trust_comfy_user_header", "auth", bool, False),
        metrics_token=r.value(au, "metrics_token", "auth", str, None),
    )
    if auth.required and not tenants and not auth.trust_comfy_user_header:
        r.problems.append("auth.required: no tenants are configured, so nobody could get in")
    known_labels = {label for b in backends for label in b.labels}
    for i, t in enumerate(tenants):
        for pool in t.pools:
            if backends and pool not in known_labels:
                r.problems.append(f"tenants[{i}].pools: no backend has the label {pool!r}")
    if r.problems:
        raise ConfigError(r.problems)
    return Config(server=server, backends=backends, store=store, scheduler=scheduler, auth=auth, tenants=tenants,
                  uploads=uploads, workflows=workflows, health=health)


def load_config(path: str | Path | None, env: dict[str, str] | None = None) -> Config:
    """Read and validate a config file; `None` gives the defaults (no backends, in-process store)."""
    if path is None:
        return Config()
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror}"]) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from exc
    return parse_config(_interpolate_tree(raw, env))


def _interpolate_tree(node: Any, env: dict[str, str] | None) -> Any:
    """`${ENV}` in string values only (not in comments or keys), after YAML parsing, so a secret with
    YAML-special characters cannot change the document's structure."""
    if isinstance(node, str):
        return interpolate_env(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    return node


def with_overrides(config: Config, *, host: str | None = None, port: int | None = None,
                   backends: list[str] | None = None, redis_url: str | None = None) -> Config:
    """Apply CLI flags over the file: flags win, and `--backend` replaces the file's list."""
    server = replace(config.server, host=host or config.server.host,
                     port=config.server.port if port is None else port)
    store = replace(config.store, redis_url=redis_url or config.store.redis_url)
    out = replace(config, server=server, store=store)
    if backends:
        out = replace(out, backends=parse_config({"backends": backends}).backends)
    return out
