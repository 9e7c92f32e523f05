"""Prometheus metrics, one registry per application (so tests can run several proxies in one process).

Labels are bounded: tenant, backend, outcome, route template, message kind — never prompt_id or
clientId. Each replica exports its own series; the HELP text says how gauges combine across replicas.
Gauges that mirror shared state (queue depth, backend state) are refreshed by a sampler once per poll
interval instead of on every change, so the hot paths only touch counters.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
DECISION_BUCKETS = (25e-6, 50e-6, 100e-6, 200e-6, 300e-6, 500e-6, 750e-6, 0.001, 0.002, 0.005, 0.01, 0.05)
# a webhook's first attempt takes milliseconds; retries stretch over up to a day
WEBHOOK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 60, 300, 1800, 3600, 21600, 86400)
JOB_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.prompts = Counter("comfy_proxy_prompts_total", "Prompts that ended, by outcome "
                               "(success, error, interrupted). Sum across replicas.",
                               ["tenant", "backend", "outcome"], registry=r)
        self.dispatched = Counter("comfy_proxy_prompts_dispatched_total", "Prompts a backend accepted from the "
                                  "proxy (a retry counts again). Sum across replicas.", ["backend"], registry=r)
        self.rejected = Counter("comfy_proxy_prompts_rejected_total", "Prompts refused at admission, by error "
                                "type. Sum across replicas.", ["tenant", "type"], registry=r)
        self.queue_depth = Gauge("comfy_proxy_queue_depth", "Prompts waiting in the proxy's shared queue. "
                                 "Every replica reports the same shared queue: use max across replicas.",
                                 ["tenant"], registry=r)
        self.queue_wait = Histogram("comfy_proxy_queue_wait_seconds", "Admission to execution_start.",
                                    ["backend"], buckets=JOB_BUCKETS, registry=r)
        self.execution = Histogram("comfy_proxy_execution_seconds", "execution_start to the prompt's end.",
                                   ["backend"], buckets=JOB_BUCKETS, registry=r)
        self.backend_up = Gauge("comfy_proxy_backend_up", "1 if the backend is available for dispatch (polled "
                                "ok, upstream socket connected, not draining). Use max across replicas.",
                                ["backend"], registry=r)
        self.backend_circuit = Gauge("comfy_proxy_backend_circuit_state", "1 for the backend's circuit breaker "
                                     "state (closed, open, half_open), 0 for the others; per replica. Use max "
                                     "across replicas.", ["backend", "state"], registry=r)
        self.backend_ejected = Gauge("comfy_proxy_backend_ejected", "1 while the backend is ejected as an outlier "
                                     "(its prompts keep failing while others succeed); per replica. Use max "
                                     "across replicas.", ["backend"], registry=r)
        self.backend_queue = Gauge("comfy_proxy_backend_queue_depth", "The backend's own queue_remaining "
                                   "(pending + running), as last polled. Use max across replicas.",
                                   ["backend"], registry=r)
        self.backend_inflight = Gauge("comfy_proxy_backend_inflight", "Prompts the proxy has at the backend "
                                      "(shared state). Use max across replicas.", ["backend"], registry=r)
        self.backend_slots = Gauge("comfy_proxy_backend_slots", "Prompts the proxy may have at the backend at "
                                   "once (its max_inflight). Use max across replicas.", ["backend"], registry=r)
        self.vram_free = Gauge("comfy_proxy_backend_vram_free_bytes", "Free VRAM of the backend's devices. "
                               "Use max across replicas.", ["backend"], registry=r)
        self.vram_total = Gauge("comfy_proxy_backend_vram_total_bytes", "Total VRAM of the backend's devices. "
                                "Use max across replicas.", ["backend"], registry=r)
        self.http = Histogram("comfy_proxy_http_request_duration_seconds", "HTTP requests by route template.",
                              ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.ws_clients = Gauge("comfy_proxy_websocket_clients", "Client websockets held by this replica. "
                                "Sum across replicas.", registry=r)
        self.asyncio_tasks = Gauge("comfy_proxy_asyncio_tasks", "asyncio tasks alive in this replica; one that "
                                   "climbs under a steady load is a leak (bench soak).", registry=r)
        self.ws_relayed = Counter("comfy_proxy_ws_messages_relayed_total", "Frames delivered to client "
                                  "sockets, by message kind. Sum across replicas.", ["kind"], registry=r)
        self.quota_rejections = Counter("comfy_proxy_quota_rejections_total", "Prompts refused by a tenant "
                                        "quota, by limit. Sum across replicas.", ["tenant", "limit"], registry=r)
        self.backend_errors = Counter("comfy_proxy_backend_errors_total", "Failed calls to backends, by kind "
                                      "(poll, dispatch, refused, upstream, lost). Sum across replicas.",
                                      ["backend", "kind"], registry=r)
        self.store_ops = Histogram("comfy_proxy_store_operation_seconds", "State store operations.", ["op"],
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.copied_files = Counter("comfy_proxy_output_copied_files_total", "Output files copied from their "
                                    "backend into the file store. Sum across replicas.", registry=r)
        self.copied_bytes = Counter("comfy_proxy_output_copied_bytes_total", "Bytes of output files copied into "
                                    "the file store. Sum across replicas.", registry=r)
        self.copy_seconds = Histogram("comfy_proxy_output_copy_seconds", "One output file, from its backend "
                                      "into the file store.", buckets=LATENCY_BUCKETS, registry=r)
        self.copy_failures = Counter("comfy_proxy_output_copy_failures_total", "Failed copies, by reason (store: "
                                     "the file store failed, backend: the backend did, missing: the file is "
                                     "gone, error: anything else (logged), given_up: too many failures). Sum "
                                     "across replicas.", ["reason"],
                                     registry=r)
        for reason in ("store", "backend", "missing", "error", "given_up"):
            self.copy_failures.labels(reason)   # a series from the start: a rate of no failures reads 0
        self.copy_retries = Counter("comfy_proxy_output_copy_retries_total", "Copies scheduled again after a "
                                    "failure. Sum across replicas.", registry=r)
        self.copy_backlog = Gauge("comfy_proxy_output_copy_backlog", "Copies queued or in progress (shared "
                                  "state). Use max across replicas.", registry=r)
        self.file_store_up = Gauge("comfy_proxy_output_store_up", "1 while the file store answers this replica. "
                                   "Use min across replicas.", registry=r)
        self.files_expired = Counter("comfy_proxy_output_files_expired_total", "Stored copies removed by "
                                     "retention. Sum across replicas.", registry=r)
        self.stored_bytes = Gauge("comfy_proxy_output_stored_bytes", "Bytes of each tenant's copies in the "
                                  "file store (shared state). Use max across replicas.", ["tenant"], registry=r)
        self.webhook_attempts = Counter("comfy_proxy_webhook_attempts_total", "Webhook delivery attempts, by "
                                        "result (delivered, gone: 410, rejected: another status, timeout, "
                                        "refused: a forbidden address, unsigned: no secret, error). Sum across "
                                        "replicas.", ["result"], registry=r)
        for result in ("delivered", "gone", "rejected", "timeout", "refused", "unsigned", "error"):
            self.webhook_attempts.labels(result)
        self.webhook_deliveries = Counter("comfy_proxy_webhook_deliveries_total", "Webhook deliveries ended, "
                                          "by outcome (delivered, stopped: 410 Gone, failed: given up). Sum "
                                          "across replicas.", ["outcome"], registry=r)
        for outcome in ("delivered", "stopped", "failed"):
            self.webhook_deliveries.labels(outcome)
        self.webhook_latency = Histogram("comfy_proxy_webhook_delivery_seconds", "From a webhook event (a "
                                         "prompt's end) to its receiver's 2xx, retries included.",
                                         buckets=WEBHOOK_BUCKETS, registry=r)
        self.webhook_outbox = Gauge("comfy_proxy_webhook_outbox", "Webhook deliveries pending (shared state). "
                                    "Use max across replicas.", registry=r)
        self.webhook_outbox_age = Gauge("comfy_proxy_webhook_outbox_oldest_seconds", "Age of the oldest pending "
                                        "webhook delivery (shared state). Use max across replicas.", registry=r)
        self.pool_waiting = Gauge("comfy_proxy_pool_prompts_waiting", "Prompts in the proxy's queue that a pool "
                                  "could take (shared state; KEDA and HPA scale on it). Use max across replicas.",
                                  ["pool"], registry=r)
        self.pool_running = Gauge("comfy_proxy_pool_prompts_running", "Prompts in flight at a pool's backends "
                                  "(shared state). Use max across replicas.", ["pool"], registry=r)
        self.pool_slots = Gauge("comfy_proxy_pool_slots", "max_inflight of a pool's available backends. Use max "
                                "across replicas.", ["pool"], registry=r)
        self.pool_oldest_wait = Gauge("comfy_proxy_pool_oldest_wait_seconds", "How long the oldest prompt a "
                                      "pool could take has waited in the proxy's queue. Use max across replicas.",
                                      ["pool"], registry=r)
        self.dispatch_decision = Histogram("comfy_proxy_dispatch_decision_seconds", "Choosing a backend for one "
                                           "queued prompt (every backend scored), on this replica.",
                                           buckets=DECISION_BUCKETS, registry=r)
        self._relayed: dict[str, Any] = {}

    def relayed(self, kind: str) -> None:
        """Per delivered frame: the labelled child is cached so this stays a dict lookup and an add."""
        child = self._relayed.get(kind)
        if child is None:
            child = self._relayed[kind] = self.ws_relayed.labels(kind)
        child.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)


def route_label(request: web.Request) -> str:
    """The route template (`/history/{prompt_id}`), never the raw path: bounded cardinality."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def http_middleware(metrics: Metrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def observe(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            if not request.path.startswith(("/ws", "/api/ws")):
                metrics.http.labels(route_label(request), request.method, str(status)).observe(
                    time.perf_counter() - start)
    return observe


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
