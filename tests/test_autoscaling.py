"""Scaling the GPU pool from zero (deploy/k8s/gpu, deploy/k8s/autoscaling): the files fit together and
validate, and the KEDA ScaledObject's query and the HPA's adapter query give the expected numbers against
a real Prometheus scraping a loaded proxy."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.config import parse_config
from tests import tools
from tests.client import ComfyClient, txt2img
from tests.conftest import wait_until
from tests.test_dashboards import prometheus, prometheus_binary

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
POOL = "gpu"


def documents(folder: str) -> list[dict[str, Any]]:
    return [doc for path in sorted((K8S / folder).glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(folder: str, kind: str) -> dict[str, Any]:
    [found] = [doc for doc in documents(folder) if doc["kind"] == kind]
    return found


def keda_query() -> str:
    [trigger] = one("autoscaling", "ScaledObject")["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    return str(trigger["metadata"]["query"])


def adapter_query(pool: str) -> str:
    rules = yaml.safe_load(one("autoscaling", "ConfigMap")["data"]["config.yaml"])
    [rule] = rules["externalRules"]
    assert rule["name"]["as"] == one("autoscaling", "HorizontalPodAutoscaler")["spec"]["metrics"][0]["external"][
        "metric"]["name"]
    return str(rule["metricsQuery"]).replace("<<.LabelMatchers>>", f'pool="{pool}"')


def test_the_gpu_pool_is_found_by_dns_and_scaled_by_keda_or_an_hpa() -> None:
    import kubernetes_validate

    deployment, service = one("gpu", "Deployment"), one("gpu", "Service")
    assert deployment["spec"]["replicas"] == 0   # the autoscaler starts it
    assert service["spec"]["clusterIP"] == "None"   # headless: one A record per ready pod
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == pod_labels
    raw = yaml.safe_load((K8S / "config.yaml").read_text())   # the whole file: tests/test_deploy.py
    [source] = parse_config({"discovery": raw["discovery"]}).discovery.dns
    assert source.name == service["metadata"]["name"] and source.port == service["spec"]["ports"][0]["port"]
    assert POOL in source.labels
    scaled = one("autoscaling", "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] == 0 and scaled["spec"]["maxReplicaCount"] >= 1
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["metadata"]["activationThreshold"] == "0"   # one waiting prompt wakes the pool
    assert float(trigger["metadata"]["threshold"]) == source.max_inflight   # one pod per max_inflight prompts
    hpa = one("autoscaling", "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["selector"]["matchLabels"] == {"pool": POOL}
    for obj in (deployment, service, hpa, one("autoscaling", "ConfigMap")):
        kubernetes_validate.validate(obj, "1.30.0", strict=True)
    kubectl = tools.tool("kubectl", "kustomize")
    for folder in ("gpu", "autoscaling"):
        args = [kubectl, "kustomize"] if Path(kubectl).name == "kubectl" else [kubectl, "build"]
        done = subprocess.run([*args, str(K8S / folder)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr


async def test_the_autoscalers_queries_count_the_pools_waiting_and_running_prompts(sims, proxies,
                                                                                  tmp_path: Path) -> None:
    """Two GPU backends of two slots each and seven long prompts: four in flight, three waiting; a backend
    outside the pool and its prompt count in `default`, not in `gpu`."""
    gpus = [await sims(f"gpu{i}", step_ms=50) for i in range(2)]
    other = await sims("cpu", step_ms=50)
    proxy = await proxies([*gpus, other], labels={"gpu0": (POOL,), "gpu1": (POOL,)})
    async with ComfyClient(proxy.url) as client, prometheus(prometheus_binary(), tmp_path, proxy.url) as prom, \
            aiohttp.ClientSession() as session:
        assert (await client.post("/proxy/backends/cpu/drain", {}))[0] == 200
        for seed in range(7):
            await client.queue_prompt(txt2img(seed=seed, steps=1000))

        async def queued() -> bool:
            _, queue = await client.get("/queue")
            return len(queue["queue_pending"]) + len(queue["queue_running"]) == 7

        await wait_until(queued, what="seven prompts admitted")

        async def value(query: str) -> float | None:
            async with session.get(prom + "/api/v1/query", params={"query": query}) as resp:
                body = await resp.json()
            assert body["status"] == "success", body
            result = body["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        async def scraped() -> bool:   # 4 in flight at the two GPU backends, 3 in the proxy's queue
            return (await value(keda_query()) == 7 and await value(adapter_query(POOL)) == 7
                    and await value(f'max(comfy_proxy_pool_prompts_running{{pool="{POOL}"}})') == 4
                    and await value(f'max(comfy_proxy_pool_slots{{pool="{POOL}"}})') == 4)
        await wait_until(scraped, timeout=30, what="the autoscalers' queries to read 7 prompts, 4 running")
        assert await value(f'max(comfy_proxy_pool_oldest_wait_seconds{{pool="{POOL}"}})') > 0
        assert await value('max(comfy_proxy_pool_slots{pool="default"})') == 0   # cpu is drained
