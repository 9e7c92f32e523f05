"""Redis connections from one URL: a plain server, a Sentinel-watched master, or a Cluster.

- `redis://[:password@]host:port/db`, `rediss://…`, `unix://…`: one server (redis-py's own URL forms).
- `redis+sentinel://[:password@]host:port[,host:port…]/service[/db]`: the master that the Sentinels name
  `service`; after a failover the client asks them again and reconnects to the new master. The password,
  if any, is the master's (Sentinels themselves are asked without one).
- `redis+cluster://[:password@]host:port[,host:port…]`: a Redis Cluster from any of its nodes. The
  store's keys share one hash tag (`{prefix}:…`), so every script and pipeline stays on one slot.

redis-py does the work in each case (failover, MOVED/ASK redirects); this module only reads the URL, and
has commands packed by hiredis (`_HiredisPacking`).
"""

from __future__ import annotations

from functools import cache
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import DataError

SENTINEL = "redis+sentinel"
CLUSTER = "redis+cluster"
CLUSTER_RETRIES = 2             # a call while a slot's primary is down: tried this many times more,
CLUSTER_BACKOFF_CAP_S = 0.25    # waiting at most this long between tries
# redis-py 8 caps a client's pool at 100 connections and fails the 101st call at once ("Too many
# connections"): a farm of hundreds of backends reconciling at start-up, or a burst of requests, made more.
# A plain server's pool holds POOL_SIZE and a call beyond them waits for one (up to POOL_WAIT_S); Sentinel's
# and Cluster's pools cannot wait, so theirs may open up to POOL_SIZE_UNWAITING.
POOL_SIZE = 128
POOL_WAIT_S = 10.0
POOL_SIZE_UNWAITING = 2048


def _hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    hosts = []
    for part in netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = part.strip().rpartition(":") if ":" in part else (part.strip(), "", "")
        hosts.append((host or "127.0.0.1", int(port) if port else default_port))
    return hosts


def _password(netloc: str) -> str | None:
    if "@" not in netloc:
        return None
    userinfo = netloc.rsplit("@", 1)[0]
    return unquote(userinfo.split(":", 1)[1]) if ":" in userinfo else unquote(userinfo) or None


class _HiredisPacking:
    """Commands packed into RESP by hiredis's C `pack_command`. redis-py's synchronous client does this
    when hiredis is installed; its asyncio client packs in Python, which was 5 % of the proxy's CPU under
    `bench admission` (every script call of every pipeline). Same bytes for what the store sends (str,
    bytes, int, float); a value redis-py refuses (bool, None) is refused here too, as a DataError."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):   # "CLIENT SETNAME" and the like: the words go as separate arguments
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:   # a bytearray, which redis-py takes and hiredis does not; or a refused type
            args = tuple(bytes(a) if isinstance(a, bytearray | memoryview) else a for a in args)
            try:
                return [hiredis.pack_command(args)]
            except TypeError as exc:
                raise DataError(str(exc)) from exc

    def pack_commands(self, commands: Any) -> list[bytes]:
        return [b"".join([self.pack_command(*command)[0] for command in commands])]


@cache
def _packing_with_hiredis(connection_class: type) -> type:
    return type(connection_class.__name__, (_HiredisPacking, connection_class), {})


def _pack_with_hiredis(client: Any) -> Any:
    """A Cluster keeps a connection class per node, made as it discovers them: it keeps redis-py's."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        pool.connection_class = _packing_with_hiredis(pool.connection_class)
    return client


def redis_client(url: str, **options: Any) -> Any:
    """An asyncio client for `url` (see the module docstring); `options` go to every connection."""
    parts = urlsplit(url)
    if parts.scheme == SENTINEL:
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError(f"{url}: a Sentinel URL names the master's service: redis+sentinel://host:port/service")
        db = int(path[1]) if len(path) > 1 else 0
        sentinel = Sentinel(_hosts(parts.netloc, 26379), socket_timeout=options.get("socket_timeout"))
        return _pack_with_hiredis(sentinel.master_for(path[0], redis_class=aioredis.Redis, db=db,
                                                      password=_password(parts.netloc),
                                                      max_connections=POOL_SIZE_UNWAITING, **options))
    if parts.scheme == CLUSTER:
        nodes = [ClusterNode(host, port) for host, port in _hosts(parts.netloc, 6379)]
        options.pop("health_check_interval", None)   # per-connection option the cluster client rejects
        # While the node of a slot is down, a call fails within a fraction of a second (POST /prompt answers
        # 503), instead of redis-py's default backoff of seconds; a promoted replica is found by the retry.
        options.setdefault("retry", Retry(ExponentialBackoff(cap=CLUSTER_BACKOFF_CAP_S, base=0.05), CLUSTER_RETRIES))
        return RedisCluster(startup_nodes=nodes, password=_password(parts.netloc),
                            max_connections=POOL_SIZE_UNWAITING, **options)
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=POOL_SIZE, timeout=POOL_WAIT_S, **options)
    return _pack_with_hiredis(aioredis.Redis.from_pool(pool))


def pubsub_clients(url: str, **options: Any) -> list[Any]:
    """Clients that can subscribe, to try in turn. A Cluster's nodes all deliver every PUBLISH, so any one
    of them will do: one client per node listed, so the bus moves on when the node it uses is down."""
    parts = urlsplit(url)
    if parts.scheme == CLUSTER:
        return [_pack_with_hiredis(aioredis.Redis(host=host, port=port, password=_password(parts.netloc), **options))
                for host, port in _hosts(parts.netloc, 6379)]
    return [redis_client(url, **options)]
