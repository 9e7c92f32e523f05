"""/metrics after real traffic: the series operators' dashboards query exist and move."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.client import ComfyClient, txt2img
from tests.conftest import wait_until


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= set(lab))


async def test_metrics_follow_a_prompt(sims, proxies) -> None:
    a = await sims("alpha")
    proxy = await proxies([a])
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        pid = await client.queue_prompt(txt2img(seed=1))
        await client.wait_done(pid)
        await client.post("/prompt", {"prompt": {"1": {"class_type": "Nope", "inputs": {}}}})

        async def sampled() -> bool:
            _, text = await client.get("/metrics")
            return _value(_samples(text), "comfy_proxy_websocket_clients") == 1
        await wait_until(sampled, what="the gauge sampler")
        status, text = await client.get("/metrics")
    assert status == 200
    s = _samples(text)
    assert _value(s, "comfy_proxy_prompts_total", backend="alpha", outcome="success", tenant="anonymous") == 1
    assert _value(s, "comfy_proxy_prompts_rejected_total", type="invalid_prompt") == 1
    assert _value(s, "comfy_proxy_backend_up", backend="alpha") == 1
    assert _value(s, "comfy_proxy_backend_vram_total_bytes", backend="alpha") > 0
    assert _value(s, "comfy_proxy_queue_wait_seconds_count", backend="alpha") == 1
    assert _value(s, "comfy_proxy_execution_seconds_count", backend="alpha") == 1
    assert _value(s, "comfy_proxy_ws_messages_relayed_total", kind="executed") == 1
    assert _value(s, "comfy_proxy_ws_messages_relayed_total", kind="preview") >= 1
    assert _value(s, "comfy_proxy_http_request_duration_seconds_count", route="/prompt", method="POST") == 2
    assert _value(s, "comfy_proxy_store_operation_seconds_count", op="admit") == 1
    assert not any("prompt_id" in dict(lab) for _, lab in s)
