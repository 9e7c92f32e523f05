"""One typed configuration, built once from a YAML file and CLI flags, validated, then handed down.

`check-config` runs exactly `load_config`, so an operator sees the same messages the server would give.
Messages name the key path (`backends[2].url: not an http(s) URL`).

The frozen dataclasses below are the whole schema: each field is a YAML key, its default is the key's
default, and its `metadata` holds the key's check (`_rule`, `_strings`). One reader walks a dataclass's
fields to read its section, so a new key is one new field. `config_keys()` lists every key by its path
for the README's reference table (tests/test_config_docs.py holds the table to it).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields, is_dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any, get_args, get_type_hints
from urllib.parse import urlparse

import yaml

from proxy.config_reader import ABSENT, ConfigError, Reader, interpolate_tree, item_kind, kinds
from proxy.workflows import TemplateError, load_templates

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8188
POLICIES = ("least_loaded", "round_robin", "random", "least_connections")
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")
EVENT_BUSES = ("streams", "pubsub")   # how events cross replicas (proxy.relay.bus)
OUTPUT_STORES = ("backend", "dir", "s3")   # where outputs and uploads live (proxy.files)
WEBHOOK_EVENTS = ("job.started", "job.completed", "job.failed", "job.cancelled")   # proxy.webhooks


# --- the checks a field carries in its metadata -------------------------------------------------------

def _rule(ok: Callable[[Any], object], why: str, **more: str) -> dict[str, Any]:
    """Field metadata: a value must satisfy `ok`, else `why` is the problem. `more`: `derived` (a default
    computed at load, in the README's words) or `yaml` (the key's path when it is not section.field)."""
    return {"check": lambda value: None if ok(value) else why, **more}


def _strings(why: str, ok: Callable[[str], object] | None = None) -> dict[str, Any]:
    """Field metadata of a list of strings: `why` is the problem when it is not a list or an item fails `ok`."""
    return {"items": (ok, why)}


def _valid_url(url: str, schemes: tuple[str, ...]) -> bool:
    parsed = urlparse(url)
    where = parsed.path if parsed.scheme == "unix" else parsed.netloc   # unix:///run/redis.sock
    return parsed.scheme in schemes and bool(where)


def _webhook_secret(value: str | None) -> bool:
    """Standard Webhooks' form: `whsec_` and the base64 of 24 to 64 random bytes."""
    if value is None:
        return True
    try:
        key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
    except (ValueError, binascii.Error):
        return False
    return value.startswith("whsec_") and 24 <= len(key) <= 64


def _cidr(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


def _template_problem(folder: str) -> str | None:
    """Workflow templates are checked with the config, so a bad file stops the start, not a later request."""
    try:
        load_templates(folder)
    except (TemplateError, OSError) as exc:
        return str(exc)
    return None


_POSITIVE = _rule(lambda n: n > 0, "must be > 0")
_NOT_NEGATIVE = _rule(lambda n: n >= 0, "must be >= 0")
_HTTP_URL = _rule(lambda url: _valid_url(url, ("http", "https")), "not an http(s) URL")
_BACKEND_NAME = _rule(re.compile(r"[A-Za-z0-9_.-]+").fullmatch, "use letters, digits, '.', '_' or '-'",
                      derived="from the URL")


# --- the schema ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BackendConfig:
    name: str = field(metadata=_BACKEND_NAME)
    url: str = field(metadata=_HTTP_URL)
    max_inflight: int = field(default=2, metadata=_rule(lambda n: 1 <= n <= 1024, "must be 1..1024"))
    weight: float = field(default=1.0, metadata=_POSITIVE)
    labels: tuple[str, ...] = field(default=(), metadata=_strings("must be a list of strings"))
    # below this much free VRAM (as polled) the backend takes no new prompt
    min_vram_free_mb: int = field(default=0, metadata=_NOT_NEGATIVE)


@dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = field(default=DEFAULT_PORT, metadata=_rule(lambda p: 0 <= p <= 65535, "not a port"))
    max_body_mb: int = field(default=100, metadata=_POSITIVE)
    # an idle connection, or one still sending its request headers, is closed
    header_timeout_s: float = field(default=60.0, metadata=_POSITIVE)
    # a request body must end or bring 64 KiB within each such window (408)
    body_timeout_s: float = field(default=30.0, metadata=_POSITIVE)
    # how clients reach the proxy (behind an ingress, maybe under a path prefix)
    public_url: str | None = field(default=None, metadata=_HTTP_URL)


@dataclass(frozen=True)
class StoreConfig:
    redis_url: str | None = field(default=None, metadata=_rule(
        lambda url: _valid_url(url, REDIS_SCHEMES),
        "not a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL", yaml="redis.url"))
    key_prefix: str = field(default="comfy-proxy", metadata=_rule(re.compile(r"[A-Za-z0-9_.:-]+").fullmatch,
                                                                  "use letters, digits, '.:_-'"))
    finished_ttl_s: int = field(default=7 * 24 * 3600, metadata=_POSITIVE)
    # how events cross replicas: Redis Streams, or pub/sub (kept to compare with in `bench`)
    events: str = field(default="streams", metadata=_rule(lambda v: v in EVENT_BUSES,
                                                          f"must be one of {', '.join(EVENT_BUSES)}",
                                                          yaml="redis.events"))
    # replicas of Redis that must hold a write before the proxy acts on it (WAIT); None: 1 behind Sentinel
    replica_acks: int | None = field(default=None, metadata=_rule(
        lambda n: n is None or (isinstance(n, int) and n >= 0), "must be 0 or more", yaml="redis.replica_acks",
        derived="1 behind Sentinel, else 0"))


@dataclass(frozen=True)
class S3Config:
    """An S3-compatible bucket (AWS S3, R2, MinIO, Ceph, GCS interoperability) for `outputs.store: s3`."""

    bucket: str | None = None
    endpoint_url: str | None = field(default=None, metadata=_HTTP_URL)   # None: AWS's own
    region: str | None = None
    prefix: str = ""                     # every key starts with it
    path_style: bool = False             # `endpoint/bucket/key` (MinIO, Ceph) instead of `bucket.endpoint/key`
    # None: botocore's standard chain (environment, shared files, container or instance roles)
    access_key_id: str | None = None
    secret_access_key: str | None = None
    create_bucket: bool = False          # create it at start when it is missing
    # the endpoint presigned links name, when clients reach the store at another address than the proxy does
    public_endpoint_url: str | None = field(default=None, metadata=_HTTP_URL)


@dataclass(frozen=True)
class OutputsConfig:
    store: str = field(default="dir", metadata=_rule(lambda v: v in OUTPUT_STORES,
                                                     f"must be one of {', '.join(OUTPUT_STORES)}"))
    # for `dir`; None: $XDG_DATA_HOME/comfy-proxy (~/.local/share/comfy-proxy)
    dir: str | None = field(default=None, metadata={"derived": "$XDG_DATA_HOME/comfy-proxy"})
    s3: S3Config = field(default_factory=S3Config)
    link_ttl_s: int = field(default=3600, metadata=_POSITIVE)   # how long a signed link works
    # the key signed links are made with; None: one made once and kept in the state store
    link_secret: str | None = field(default=None, metadata={"derived": "kept in the state store"})
    # how long a copied output is kept; None: store.finished_ttl_s
    ttl_s: int | None = field(default=None, metadata=_rule(lambda n: n is None or n > 0, "must be > 0",
                                                           derived="store.finished_ttl_s"))
    copy_concurrency: int = field(default=8, metadata=_rule(lambda n: 1 <= n <= 256, "must be 1..256"))


@dataclass(frozen=True)
class JobsConfig:
    # `POST /proxy/run?inline=1`: outputs up to this size come in the answer, base64
    inline_max_bytes: int = field(default=1024 * 1024, metadata=_NOT_NEGATIVE)


_WHSEC = _rule(_webhook_secret, "must be whsec_ and the base64 of 24 to 64 bytes (Standard Webhooks)")
_EVENTS = _strings(f"must be a list of {', '.join(WEBHOOK_EVENTS)}", lambda e: e in WEBHOOK_EVENTS)


@dataclass(frozen=True)
class WebhooksConfig:
    """Completion webhooks (proxy.webhooks): delivery, retries and which receivers may be called."""

    # signs deliveries of prompts of no tenant (a farm without tenants); tenants have their own
    secret: str | None = field(default=None, metadata=_WHSEC)
    max_attempts: int = field(default=20, metadata=_rule(lambda n: 1 <= n <= 100, "must be 1..100"))
    timeout_s: float = field(default=10.0, metadata=_POSITIVE)    # per attempt; then it counts as failed
    retry_base_s: float = field(default=2.0, metadata=_POSITIVE)   # the first retry's wait; doubles per attempt
    # the longest wait between attempts (a day at most: a delivery untried for 3 days leaves the outbox)
    retry_cap_s: float = field(default=3 * 3600.0, metadata=_rule(lambda n: 0 < n <= 86400, "must be 0..86400"))
    per_host: int = field(default=4, metadata=_rule(lambda n: 1 <= n <= 256, "must be 1..256"))   # at once
    concurrency: int = field(default=64, metadata=_rule(lambda n: 1 <= n <= 4096, "must be 1..4096"))
    # receivers on loopback, private, link-local or metadata addresses may be called (tests, internal hooks)
    allow_private: bool = False
    # networks whose addresses may be called all the same (`10.20.0.0/16`)
    allow_cidrs: tuple[str, ...] = field(default=(), metadata=_strings("must be a list of CIDRs", _cidr))


@dataclass(frozen=True)
class TenantWebhook:
    """A tenant's default webhook (prompts that name none get it) and the secret its deliveries carry."""

    url: str | None = field(default=None, metadata=_rule(
        lambda url: url is None or (len(url) <= 2048 and _valid_url(url, ("http", "https"))),
        "not an http(s) URL of at most 2048 characters"))
    secret: str | None = field(default=None, metadata=_WHSEC)
    events: tuple[str, ...] = field(default=WEBHOOK_EVENTS, metadata=_EVENTS)


@dataclass(frozen=True)
class DnsConfig:
    # servers (`host` or `host:port`) that resolve webhook receivers' names; empty: the system's resolver
    nameservers: tuple[str, ...] = field(default=(), metadata=_strings("must be a list of host or host:port"))


@dataclass(frozen=True)
class DnsDiscovery:
    """Backends named by DNS: each A/AAAA address is a backend (at `port`), or each SRV target with its port
    when `name` is an SRV name (`_comfy._tcp.gpus.example`). A Kubernetes headless Service, `docker compose
    --scale`, Consul."""

    name: str = field(metadata=_rule(lambda n: bool(n) and len(n) <= 253, "a DNS name"))
    port: int = field(default=8188, metadata=_rule(lambda p: 1 <= p <= 65535, "not a port"))
    interval_s: float = field(default=10.0, metadata=_POSITIVE)   # how often the name is resolved again
    labels: tuple[str, ...] = field(default=(), metadata=_strings("must be a list of strings"))
    max_inflight: int = field(default=2, metadata=_rule(lambda n: 1 <= n <= 1024, "must be 1..1024"))


@dataclass(frozen=True)
class DiscoveryConfig:
    dns: tuple[DnsDiscovery, ...] = ()   # names resolved into backends (proxy.discovery)


@dataclass(frozen=True)
class UploadsConfig:
    dir: str | None = None   # None: a temporary folder for this process (fine for one replica)


@dataclass(frozen=True)
class WorkflowsConfig:
    # a folder of workflow templates (proxy.workflows); None: the routes list nothing
    dir: str | None = field(default=None, metadata={"check": _template_problem})
    # a ComfyAPI socket (`/ws/register`) that sent and received nothing and waits for no run this long is closed
    socket_idle_s: float = field(default=3600.0, metadata=_POSITIVE)
    # image inputs given as URLs (proxy.imagefetch): body size, time and redirects allowed
    image_max_mb: float = field(default=20.0, metadata=_POSITIVE)
    image_timeout_s: float = field(default=30.0, metadata=_POSITIVE)
    image_max_redirects: int = field(default=3, metadata=_rule(lambda n: 0 <= n <= 10, "must be 0..10"))
    # image URLs on loopback, private, link-local or metadata addresses may be fetched (not webhooks': a
    # tenant reads back what was fetched, so this one lets tenants read internal services' images)
    image_allow_private: bool = False
    image_allow_cidrs: tuple[str, ...] = field(default=(), metadata=_strings("must be a list of CIDRs", _cidr))


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = field(default="least_loaded", metadata=_rule(lambda p: p in POLICIES,
                                                               f"must be one of {', '.join(POLICIES)}"))
    poll_interval_s: float = field(default=1.0, metadata=_POSITIVE)
    backend_timeout_s: float = field(default=5.0, metadata=_POSITIVE)
    # a backend unreachable this long gives its prompts back (proxy.dispatch)
    failover_after_s: float = field(default=5.0, metadata=_POSITIVE)
    # times a prompt that was running on a dead backend is run again
    retry_max_attempts: int = field(default=1, metadata=_rule(lambda n: 0 <= n <= 10, "must be 0..10"))
    # prompts a tenant back from idle may queue ahead of backlogged ones
    idle_tenant_credit: float = field(default=8.0, metadata=_rule(lambda n: 0 <= n <= 1000, "must be 0..1000"))


@dataclass(frozen=True)
class HealthConfig:
    """Circuit breaker and outlier ejection per backend (proxy.health)."""

    # consecutive failed requests that open a backend's circuit
    failure_threshold: int = field(default=3, metadata=_POSITIVE)
    open_s: float = field(default=1.0, metadata=_POSITIVE)          # first wait before the half-open probe; doubles
    open_max_s: float = field(default=60.0, metadata=_POSITIVE)     # cap of that wait
    # consecutive execution_errors that eject a backend (0: never)
    outlier_errors: int = field(default=5, metadata=_NOT_NEGATIVE)
    ejection_s: float = field(default=30.0, metadata=_POSITIVE)     # first ejection; doubles per ejection
    ejection_max_s: float = field(default=300.0, metadata=_POSITIVE)  # cap of an ejection
    # of the farm, rounded down, ejected at once at most
    max_ejected_fraction: float = field(default=0.5, metadata=_rule(lambda f: 0 <= f < 1,
                                                                    "must be at least 0 and below 1"))


@dataclass(frozen=True)
class Quota:
    """Per-tenant limits; None means unlimited."""

    max_queued: int | None = field(default=None, metadata=_POSITIVE)   # queued in the proxy + at backends + running
    per_minute: int | None = field(default=None, metadata=_POSITIVE)   # prompts admitted per calendar minute
    per_day: int | None = field(default=None, metadata=_POSITIVE)      # prompts admitted per UTC day
    # execution time (execution_start → end) per UTC day
    gpu_seconds_per_day: float | None = field(default=None, metadata=_POSITIVE)
    # outputs kept in the file store; over it, new prompts are refused
    storage_mb: float | None = field(default=None, metadata=_POSITIVE)


@dataclass(frozen=True)
class TenantConfig:
    name: str = field(metadata=_rule(re.compile(r"[A-Za-z0-9_.@-]+").fullmatch,
                                     "use letters, digits, '.', '_', '@' or '-'"))
    # plain keys, or "sha256:<hex>" digests of keys
    api_keys: tuple[str, ...] = field(default=(), metadata=_strings("must be a list of non-empty strings", bool))
    role: str = field(default="user", metadata=_rule(lambda v: v in ("user", "admin"), "must be user or admin"))
    quota: Quota = field(default_factory=Quota)
    # backend labels this tenant may use; empty = all
    pools: tuple[str, ...] = field(default=(), metadata=_strings("must be a list of backend labels"))
    weight: float = field(default=1.0, metadata=_POSITIVE)   # share of the farm when it is saturated (fair queueing)
    # how long this tenant's outputs are kept; None: outputs.ttl_s
    outputs_ttl_s: int | None = field(default=None, metadata=_POSITIVE)
    webhook: TenantWebhook = field(default_factory=TenantWebhook)

    @property
    def admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class AuthConfig:
    required: bool = field(default=False, metadata={"derived": "true when tenants are configured"})
    trust_comfy_user_header: bool = False
    metrics_token: str | None = None
    # tokens `comfy-proxy join` agents present: they may add, renew and remove their backends, nothing else
    join_tokens: tuple[str, ...] = field(default=(), metadata=_strings("must be a list of non-empty strings", bool))


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
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)

    def tenant(self, name: str) -> TenantConfig | None:
        return next((t for t in self.tenants if t.name == name), None)

    def webhook_secret(self, tenant: str) -> str | None:
        """The secret a tenant's deliveries are signed with: its own. The farm's `webhooks.secret` signs
        only prompts of no tenant (a farm without tenants): every receiver holding a secret could forge
        deliveries to every other receiver of that secret, so tenants never share one."""
        own = self.tenant(tenant)
        if own is not None and own.webhook.secret:
            return own.webhook.secret
        return self.webhooks.secret if tenant == "" else None

    def outputs_ttl_s(self, tenant: str) -> int:
        """How long a tenant's stored outputs are kept."""
        own = next((t.outputs_ttl_s for t in self.tenants if t.name == tenant), None)
        return own or self.outputs.ttl_s or self.store.finished_ttl_s


# --- the sections -------------------------------------------------------------------------------------

def config_keys() -> dict[str, Field[Any]]:
    """Every key of the YAML file by its path (`server.port`, `backends[].url`, `tenants[].quota.per_day`,
    `redis.url`) with the field that holds it: the README's reference table is checked against this."""
    out: dict[str, Field[Any]] = {}
    for name, hint in get_type_hints(Config).items():
        args = get_args(hint)   # tuple[BackendConfig, ...]: a list of such sections
        out |= _keys_of(args[0], f"{name}[]") if args else _keys_of(hint, name)
    return out


def _keys_of(cls: type, prefix: str) -> dict[str, Field[Any]]:
    out: dict[str, Field[Any]] = {}
    for f in fields(cls):
        kind = kinds(cls)[f.name]
        item = item_kind(cls, f.name) if kind is tuple else None
        if is_dataclass(kind):
            out |= _keys_of(kind, f"{prefix}.{f.name}")   # type: ignore[arg-type]
        elif item is not None:
            out |= _keys_of(item, f"{prefix}.{f.name}[]")
        else:
            out[f.metadata.get("yaml", f"{prefix}.{f.name}")] = f
    return out


@cache
def _top_keys() -> frozenset[str]:
    return frozenset(path.split(".")[0].removesuffix("[]") for path in config_keys())


def _read_store(r: Reader, top: dict[str, Any]) -> StoreConfig:
    """`store:` and `redis:` (`redis.url`, `redis.events`), keys that live outside their dataclass's section."""
    values = r.values(StoreConfig, top.get("store"), "store")
    elsewhere = {f.metadata["yaml"].removeprefix("redis."): f for f in fields(StoreConfig) if "yaml" in f.metadata}
    redis = r.section(top.get("redis"), "redis", set(elsewhere))
    for key, f in elsewhere.items():
        value = r.field(StoreConfig, f, redis.get(key), f"redis.{key}")
        if value is not ABSENT:
            values[f.name] = value
    return StoreConfig(**values)


def _read_health(r: Reader, raw: Any) -> HealthConfig:
    health = r.read(HealthConfig, raw, "health")
    if health.open_max_s < health.open_s:
        r.note("health.open_max_s", "must be >= health.open_s")
    if health.ejection_max_s < health.ejection_s:
        r.note("health.ejection_max_s", "must be >= health.ejection_s")
    return health


def _name_from_url(url: str) -> str:
    parsed = urlparse(url)
    return re.sub(r"[^A-Za-z0-9_.-]", "-", parsed.netloc)


def _read_backends(r: Reader, raw: Any) -> tuple[BackendConfig, ...]:
    out: list[BackendConfig] = []
    names: set[str] = set()
    for i, item in enumerate(r.items(raw, "backends")):
        path = f"backends[{i}]"
        values = r.values(BackendConfig, {"url": item} if isinstance(item, str) else item, path)
        if "url" not in values:
            continue
        url = values["url"].rstrip("/")
        name = values.get("name") or _name_from_url(url)
        if name in names:
            r.note(f"{path}.name", f"duplicate backend name {name!r}")
        names.add(name)
        out.append(BackendConfig(**{**values, "name": name, "url": url}))
    return tuple(out)


def _read_tenants(r: Reader, raw: Any, backends: tuple[BackendConfig, ...]) -> tuple[TenantConfig, ...]:
    out: list[TenantConfig] = []
    names: set[str] = set()
    keys: set[str] = set()   # every tenant's, so no key names two tenants
    labels = {label for b in backends for label in b.labels}
    for i, item in enumerate(r.items(raw, "tenants")):
        path = f"tenants[{i}]"
        values = r.values(TenantConfig, item, path)
        if "name" not in values:
            continue
        if values["name"] in names:
            r.note(f"{path}.name", f"duplicate tenant {values['name']!r}")
        names.add(values["name"])
        tenant = TenantConfig(**values)
        _check_api_keys(r, tenant.api_keys, path, keys)
        if tenant.webhook.url and not tenant.webhook.secret:
            r.note(f"{path}.webhook.secret", "required with webhook.url: the deliveries are signed with it")
        for pool in tenant.pools:
            if backends and pool not in labels:
                r.note(f"{path}.pools", f"no backend has the label {pool!r}")
        out.append(tenant)
    return tuple(out)


def _check_api_keys(r: Reader, api_keys: tuple[str, ...], path: str, seen: set[str]) -> None:
    for j, key in enumerate(api_keys):
        if key.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-f]{64}", key):
            r.note(f"{path}.api_keys[{j}]", "sha256: must be followed by 64 lowercase hex digits")
        if key in seen:
            r.note(f"{path}.api_keys[{j}]", "key used by another tenant")
        seen.add(key)


def _read_auth(r: Reader, raw: Any, tenants: tuple[TenantConfig, ...]) -> AuthConfig:
    auth = r.read(AuthConfig, raw, "auth", required=bool(tenants))
    _check_api_keys(r, auth.join_tokens, "auth.join_tokens", {k for t in tenants for k in t.api_keys})
    if auth.required and not tenants and not auth.trust_comfy_user_header:
        r.note("auth.required", "no tenants are configured, so nobody could get in")
    return auth


def parse_config(raw: Any) -> Config:
    """Turn a parsed YAML document into a `Config`, or raise `ConfigError` listing every bad key."""
    r = Reader()
    top = r.section(raw, "", set(_top_keys()))
    workflows = r.read(WorkflowsConfig, top.get("workflows"), "workflows")
    uploads = r.read(UploadsConfig, top.get("uploads"), "uploads")
    outputs = r.read(OutputsConfig, top.get("outputs"), "outputs")
    jobs = r.read(JobsConfig, top.get("jobs"), "jobs")
    webhooks = r.read(WebhooksConfig, top.get("webhooks"), "webhooks")
    dns = r.read(DnsConfig, top.get("dns"), "dns")
    discovery = r.read(DiscoveryConfig, top.get("discovery"), "discovery")
    if outputs.store == "s3" and not outputs.s3.bucket:
        r.note("outputs.s3.bucket", "required when outputs.store is s3")
    server = r.read(ServerConfig, top.get("server"), "server")
    store = _read_store(r, top)
    scheduler = r.read(SchedulerConfig, top.get("scheduler"), "scheduler")
    health = _read_health(r, top.get("health"))
    backends = _read_backends(r, top.get("backends"))
    tenants = _read_tenants(r, top.get("tenants"), backends)
    auth = _read_auth(r, top.get("auth"), tenants)
    if r.problems:
        raise ConfigError(r.problems)
    return Config(server=server, backends=backends, store=store, scheduler=scheduler, auth=auth, tenants=tenants,
                  uploads=uploads, workflows=workflows, health=health, outputs=outputs, jobs=jobs,
                  webhooks=webhooks, dns=dns, discovery=discovery)


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
    return parse_config(interpolate_tree(raw, env))


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
