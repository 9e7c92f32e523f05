"""`comfy-proxy`: serve, sim, demo, check-config, bench, join (PRODUCT.md, "Command line")."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp import web

from proxy.app import create_app
from proxy.bench import SCENARIOS, run_scenario
from proxy.config import BackendConfig, Config, ConfigError, ServerConfig, load_config, with_overrides
from proxy.gc_tuning import settle_after_start
from proxy.join import JoinAgent, JoinOptions
from proxy.logging import configure_logging
from proxy.services import SERVICES
from proxy.sim import SimOptions, add_sim_arguments, options_from_args, start_sim
from proxy.tasks import TaskOwner


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comfy-proxy", description="One ComfyUI endpoint for a GPU farm.")
    parser.add_argument("--log-level", default="info")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="YAML config file")
    serve.add_argument("--backend", action="append", default=[], help="backend URL (repeat; replaces the file's)")
    serve.add_argument("--redis", help="Redis URL: share state with other replicas")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)

    sim = sub.add_parser("sim", help="run one simulated ComfyUI server")
    add_sim_arguments(sim)

    demo = sub.add_parser("demo", help="simulated backends and a proxy in front of them")
    demo.add_argument("--backends", type=int, default=3)
    demo.add_argument("--port", type=int, default=8188)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--step-ms", type=float, default=50.0)

    bench = sub.add_parser("bench", help="run a benchmark on loopback (it starts what it needs)")
    bench.add_argument("scenario", choices=SCENARIOS)
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    bench.add_argument("--minutes", type=float, help="how long the soak scenario runs (default 30; --quick: 1)")

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file")

    join = sub.add_parser("join", help="put one ComfyUI in a farm, and take it out on SIGTERM")
    join.add_argument("--proxy", required=True, help="the proxy's URL")
    join.add_argument("--token", required=True, help="a join token (auth.join_tokens)")
    join.add_argument("--backend", required=True, help="this ComfyUI's URL, as the proxy reaches it")
    join.add_argument("--name", help="its name in the farm (default: from the URL)")
    join.add_argument("--labels", default="", help="pools it belongs to, comma-separated")
    join.add_argument("--max-inflight", type=int)
    join.add_argument("--weight", type=float)
    join.add_argument("--lease-s", type=float, default=15.0, help="renewed every third of it")
    return parser


async def _run_until_signal(runners: list[web.AppRunner]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def server_options(server: ServerConfig) -> dict[str, Any]:
    """The proxy's aiohttp server settings against slow senders. aiohttp (3.14) runs `keepalive_timeout`
    from the moment a connection opens and closes one whose request headers have not all arrived by then;
    its default (3630 s) would let a client that trickles headers hold a connection for an hour. Bodies
    have no aiohttp timeout: `api.middleware.slow_body_middleware` bounds them."""
    return {"keepalive_timeout": server.header_timeout_s}


async def _start(app: web.Application, host: str, port: int, server: ServerConfig | None = None) -> web.AppRunner:
    options = server_options(server) if server is not None else {}
    runner = web.AppRunner(app, access_log=None, handle_signals=False, **options)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def base_url(host: str, port: int) -> str:
    """The URL to give a person for a listening address: a wildcard address as loopback, an IPv6
    literal in brackets."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def where(server: ServerConfig) -> list[str]:
    """Where a person finds the page, the API and the operator routes: under `server.public_url` when
    set (the address clients use, behind an ingress perhaps under a prefix), else the listening address."""
    base = (server.public_url or base_url(server.host, server.port)).rstrip("/")
    ws = base.replace("http", "ws", 1)
    return [f"  web page     {base}/",
            f"  ComfyUI API  {base}/prompt, /history, /view, ... (also under /api), websocket {ws}/ws",
            f"  metrics      {base}/metrics",
            f"  backends     {base}/proxy/backends"]


async def serve(config: Config, config_path: str | None) -> None:
    app = create_app(config, config_path=config_path)
    runner = await _start(app, config.server.host, config.server.port, config.server)
    settle_after_start()
    print(f"comfy-proxy listening on {base_url(config.server.host, config.server.port)}", flush=True)
    print("\n".join(where(config.server)), flush=True)
    if config_path is not None:
        reloads = TaskOwner()

        async def reload() -> None:
            try:
                await app[SERVICES].reloader.reload_file(config_path)
            except ConfigError as exc:
                print(f"reload refused: {'; '.join(exc.problems)}", file=sys.stderr, flush=True)

        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: reloads.spawn(reload()))
    await _run_until_signal([runner])


async def run_sim(args: argparse.Namespace) -> None:
    """One simulator, or `--count` of them in one process (a farm of hundreds on one machine): on ports
    `--port`.. `--port`+N-1, or with `--port 0` each on a free port of its own (the lines printed say which)."""
    options = options_from_args(args)
    if args.count < 1:
        raise SystemExit("comfy-proxy sim: --count N needs N >= 1")
    farm = [options] if args.count == 1 else [
        replace(options, name=f"{options.name}-{i}", port=options.port + i if options.port else 0)
        for i in range(args.count)]
    sims = [await start_sim(o) for o in farm]
    settle_after_start()
    for s in sims:
        print(f"simulated ComfyUI {s.name!r} on {s.url}", flush=True)
    try:
        await _run_until_signal([])
    finally:
        for s in sims:
            await s.close()


async def demo(args: argparse.Namespace) -> None:
    sims = [await start_sim(SimOptions(name=f"sim-{i + 1}", port=0, step_ms=args.step_ms))
            for i in range(args.backends)]
    config = replace(with_overrides(Config(), host=args.host, port=args.port),
                     backends=tuple(BackendConfig(name=s.name, url=s.url) for s in sims))
    runner = await _start(create_app(config), args.host, args.port, config.server)
    settle_after_start()
    for s in sims:
        print(f"simulated backend {s.name} at {s.url}", flush=True)
    print(f"comfy-proxy demo ready: {base_url(args.host, args.port)} (Ctrl-C stops everything)", flush=True)
    print("\n".join(where(config.server)), flush=True)
    try:
        await _run_until_signal([runner])
    finally:
        for s in sims:
            await s.close()


async def run_join(args: argparse.Namespace) -> None:
    options = JoinOptions(proxy=args.proxy, token=args.token, backend=args.backend, name=args.name,
                          labels=tuple(label for label in args.labels.split(",") if label),
                          max_inflight=args.max_inflight, weight=args.weight, lease_s=args.lease_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with aiohttp.ClientSession() as session:
        await JoinAgent(options, session).run(stop)


async def bench(args: argparse.Namespace) -> None:
    result = await run_scenario(args.scenario, quick=args.quick, minutes=args.minutes)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"scenario {result.scenario}")
        for name, value in result.figures.items():
            print(f"  {name:32} {value:>12} {result.units[name]}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command not in ("check-config", "bench"):  # they print their own results
        configure_logging(args.log_level)
    try:
        if args.command == "check-config":
            config = load_config(args.file)
            print(f"{args.file}: ok ({len(config.backends)} backends, "
                  f"{'redis' if config.store.redis_url else 'in-process'} store)")
            return 0
        if args.command == "serve":
            config = with_overrides(load_config(args.config), host=args.host, port=args.port,
                                    backends=args.backend or None, redis_url=args.redis)
            _run(serve(config, args.config))   # no backends: they may join (proxy.membership)
        elif args.command == "sim":
            _run(run_sim(args))
        elif args.command == "demo":
            _run(demo(args))
        elif args.command == "bench":
            _run(bench(args))
        elif args.command == "join":
            _run(run_join(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 1
    return 0


def _run(coro: object) -> None:
    try:  # in the function: optional (no uvloop on Windows), and only the process that runs a loop needs it
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
    else:
        uvloop.run(coro)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
