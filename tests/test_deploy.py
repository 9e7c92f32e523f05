"""The files operators deploy with, checked by the tools that will read them:

- deploy/prometheus: `promtool check rules`, `promtool test rules` (alerts_test.yml), `promtool check config`;
- deploy/compose: docker-compose's own validator (`docker-compose config`), then what it resolved: the
  services, their commands, healthchecks and mounts, and the proxy config they mount, validated by the
  proxy's own `check-config`, its output store the MinIO service;
- deploy/Dockerfile: what it copies exists and what it runs is what compose and Kubernetes run;
- deploy/k8s: rendered by kustomize, every object validated against the Kubernetes OpenAPI schemas
  (kubernetes-validate, offline, strict), then the references between objects (selectors, Secret keys,
  ConfigMap, claims, the Redis URL), the proxy config in the ConfigMap and the S3 settings it reads from
  the pod's env.

A missing tool fails its test with the line that installs it; nothing here skips.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from tests import tools

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
COMPOSE = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
DASHBOARDS = ROOT / "dashboards"
PROXY_COMMAND = ["comfy-proxy", "serve", "--config", "/etc/comfy-proxy/config.yaml"]
PORT = 8188
# The oldest Kubernetes minor still commonly run, and the newest the bundled schemas know.
K8S_VERSIONS = ("1.29.0", "latest")
REQUIRED_ALERTS = {"ComfyProxyBackendDown", "ComfyProxyFarmSaturated", "ComfyProxyQueueWaitHigh",
                   "ComfyProxyVramExhausted", "ComfyProxyPromptErrorRateHigh", "ComfyProxyOutputCopyBacklog",
                   "ComfyProxyOutputStoreDown"}
MINIO_API_PORT = 9000


def run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, f"{' '.join(args)} (in {cwd}) failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def check_config(path: Path, env: dict[str, str]) -> None:
    """`comfy-proxy check-config`, the validation the server runs, with the container's environment."""
    out = run(sys.executable, "-m", "proxy.cli", "check-config", str(path), env=env)
    assert ": ok (" in out, out


def load_proxy_config(path: Path, env: dict[str, str]) -> Any:
    from proxy.config import load_config

    return load_config(path, env=env)


# --- Prometheus --------------------------------------------------------------------------------------

def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool = tools.tool("promtool")
    out = run(promtool, "check", "rules", "alerts.yml", cwd=PROM)
    assert "SUCCESS" in out, out
    out = run(promtool, "test", "rules", "alerts_test.yml", cwd=PROM)
    assert "SUCCESS" in out, out


def test_every_alert_is_documented_and_unit_tested() -> None:
    rules = [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert REQUIRED_ALERTS <= set(alerts), REQUIRED_ALERTS - set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name
        assert rule.get("for"), f"{name}: a one-scrape blip must not page anyone"
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]}
    assert set(alerts) <= fired, f"alerts never shown firing in alerts_test.yml: {set(alerts) - fired}"


def test_prometheus_config_scrapes_every_proxy_replica() -> None:
    promtool = tools.tool("promtool")
    run(promtool, "check", "config", "prometheus.yml", cwd=PROM)
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "comfy-proxy"]
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    services = compose_config()["services"]
    assert targets == {f"{name}:{PORT}" for name in proxy_services(services)}
    assert job.get("metrics_path", "/metrics") == "/metrics"


# --- docker compose ----------------------------------------------------------------------------------
_compose_cache: dict[str, Any] = {}


def compose_config() -> dict[str, Any]:
    """The compose file as docker-compose resolves it (merge keys, interpolation, absolute paths),
    after its own schema validation."""
    if not _compose_cache:
        binary = tools.tool("docker-compose")
        out = run(binary, "--project-directory", str(COMPOSE), "-f", str(COMPOSE / "docker-compose.yml"),
                  "config", cwd=COMPOSE)
        _compose_cache.update(yaml.safe_load(out))
    return _compose_cache


def proxy_services(services: dict[str, Any]) -> list[str]:
    return sorted(name for name, s in services.items() if s.get("command", [])[:2] == ["comfy-proxy", "serve"])


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """target → source, for the short syntax docker-compose prints."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def test_compose_file_passes_docker_compose_validation() -> None:
    services = compose_config()["services"]
    assert {"redis", "prometheus", "grafana"} <= set(services)
    assert len(proxy_services(services)) >= 2


def test_compose_proxies_share_redis_and_probe_readiness() -> None:
    config = compose_config()
    services = config["services"]
    for name in proxy_services(services):
        proxy = services[name]
        assert proxy["command"] == PROXY_COMMAND, name
        assert proxy["build"]["dockerfile"] == "deploy/Dockerfile" and Path(proxy["build"]["context"]) == ROOT
        assert "/proxy/readyz" in " ".join(proxy["healthcheck"]["test"]), name
        assert proxy["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert mounts(proxy)["/etc/comfy-proxy/config.yaml"] == str(COMPOSE / "config.yaml")
        env = {k: str(v) for k, v in proxy["environment"].items()}
        cfg = load_proxy_config(COMPOSE / "config.yaml", env)
        check_config(COMPOSE / "config.yaml", env)
        # Every replica reaches the same Redis service, and uploads live on a volume they all share.
        assert urlparse(cfg.store.redis_url).hostname == "redis"
        assert mounts(proxy)[cfg.uploads.dir] in config["volumes"], "uploads.dir must be a shared volume"
        for backend in cfg.backends:
            host, port = urlparse(backend.url).hostname, urlparse(backend.url).port
            assert host in services and port == PORT, backend
            assert "condition" in proxy["depends_on"][host], backend
            assert "command" in services[host] and services[host].get("healthcheck"), host
    published = [p["published"] for n in proxy_services(services) for p in services[n]["ports"]]
    assert len(published) == len(set(published))


def test_compose_proxies_store_outputs_in_minio() -> None:
    config = compose_config()
    services = config["services"]
    minio = services["minio"]
    assert minio["image"].startswith("minio/minio:")
    assert minio["command"] == ["server", "/data", "--console-address", ":9001"]
    assert minio["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    assert mounts(minio)["/data"] in config["volumes"], "MinIO's data must outlive its container"
    for name in proxy_services(services):
        proxy = services[name]
        assert proxy["depends_on"]["minio"]["condition"] == "service_healthy", name
        cfg = load_proxy_config(COMPOSE / "config.yaml", {k: str(v) for k, v in proxy["environment"].items()})
        s3 = cfg.outputs.s3
        assert cfg.outputs.store == "s3" and s3.bucket, name
        endpoint = urlparse(s3.endpoint_url)
        assert (endpoint.hostname, endpoint.port) == ("minio", MINIO_API_PORT), s3.endpoint_url
        # One host name for every bucket, and a fresh MinIO has none yet.
        assert s3.path_style and s3.create_bucket, name
        # The proxies sign in to MinIO with the pair MinIO was started with, after compose's interpolation.
        assert (s3.access_key_id, s3.secret_access_key) == (minio["environment"]["MINIO_ROOT_USER"],
                                                            minio["environment"]["MINIO_ROOT_PASSWORD"]), name


def test_compose_backends_are_simulators_by_default() -> None:
    services = compose_config()["services"]
    sims = {name: s for name, s in services.items() if s.get("command", [])[:2] == ["comfy-proxy", "sim"]}
    assert len(sims) >= 2
    for name, sim in sims.items():
        cmd = sim["command"]
        assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == str(PORT)
        assert cmd[cmd.index("--name") + 1] == name
    text = (COMPOSE / "docker-compose.yml").read_text()
    assert re.search(r"#\s+command: \[\"python\", \"main.py\", \"--listen\", \"0.0.0.0\"", text), \
        "keep the commented GPU ComfyUI service to switch to"


def test_compose_mounts_exist_and_wire_prometheus_and_grafana() -> None:
    config = compose_config()
    services = config["services"]
    for name, service in services.items():
        for target, source in mounts(service).items():
            if source.startswith("/"):
                assert Path(source).exists(), f"{name}: {source} (mounted at {target}) is not in the repository"
            else:
                assert source in config["volumes"], f"{name}: volume {source} is not declared"
    prom = mounts(services["prometheus"])
    assert prom["/etc/prometheus/prometheus.yml"] == str(PROM / "prometheus.yml")
    assert prom["/etc/prometheus/alerts.yml"] == str(PROM / "alerts.yml")
    grafana = mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning/datasources"] == str(DASHBOARDS / "provisioning" / "datasources")
    assert grafana["/etc/grafana/provisioning/dashboards"] == str(DASHBOARDS / "provisioning" / "dashboards")
    provider = yaml.safe_load((DASHBOARDS / "provisioning" / "dashboards" / "comfy-proxy.yaml").read_text())
    dashboards_at = provider["providers"][0]["options"]["path"]
    assert grafana[dashboards_at] == str(DASHBOARDS), "the provider must read the mounted dashboards/"
    source = yaml.safe_load((DASHBOARDS / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert urlparse(source["datasources"][0]["url"]).hostname == "prometheus"
    home = services["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert home.startswith(dashboards_at) and (DASHBOARDS / Path(home).name).exists()


# --- Dockerfile ----------------------------------------------------------------------------------------
def test_dockerfile_installs_the_project_and_runs_the_proxy() -> None:
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    copied = [part for ln in lines if ln.startswith("COPY ") for part in ln.split()[1:-1]]
    assert copied and all((ROOT / part).exists() for part in copied), copied
    assert any(ln.startswith("RUN pip install .") for ln in lines)
    assert "EXPOSE 8188" in lines
    assert any(ln.startswith("USER ") and ln != "USER root" for ln in lines), "run as a non-root user"
    cmd = next(ln for ln in lines if ln.startswith("CMD "))
    assert yaml.safe_load(cmd[4:]) == PROXY_COMMAND
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "*" in ignore and all(f"!{p.rstrip('/')}" in [i.rstrip("/") for i in ignore] for p in copied)


# --- Kubernetes ----------------------------------------------------------------------------------------
_k8s_cache: list[dict[str, Any]] = []


def k8s_objects() -> list[dict[str, Any]]:
    """deploy/k8s rendered by kustomize (standalone, or the one built into kubectl)."""
    if not _k8s_cache:
        kustomize = tools.find("kustomize")
        if kustomize:
            out = run(kustomize, "build", str(K8S))
        else:
            out = run(tools.tool("kubectl"), "kustomize", str(K8S))  # kubectl carries kustomize
        _k8s_cache.extend(doc for doc in yaml.safe_load_all(out) if doc)
    return _k8s_cache


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_k8s_objects_validate_against_the_kubernetes_schemas() -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    objects = k8s_objects()
    kinds = sorted(o["kind"] for o in objects)
    for kind in ("ConfigMap", "Deployment", "PodDisruptionBudget", "Secret", "Service"):
        assert kind in kinds, kinds
    errors = []
    for version in K8S_VERSIONS:
        version = latest_version() if version == "latest" else version
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{version} {obj['kind']}/{obj['metadata']['name']}: {exc.message} at "
                              f"{'.'.join(map(str, exc.path))}")
    assert not errors, "\n".join(errors)


def proxy_deployment() -> dict[str, Any]:
    return one("Deployment", "comfy-proxy")


def proxy_container() -> dict[str, Any]:
    [container] = proxy_deployment()["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_k8s_proxy_runs_replicas_with_probes_and_a_disruption_budget() -> None:
    deploy = proxy_deployment()
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["replicas"] >= 2
    assert selects(deploy["spec"]["selector"]["matchLabels"], pod_labels)
    c = proxy_container()
    assert c["args"] == PROXY_COMMAND
    [port] = c["ports"]
    assert port["containerPort"] == PORT
    assert c["readinessProbe"]["httpGet"]["path"] == "/proxy/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/proxy/healthz"
    for probe in (c["readinessProbe"], c["livenessProbe"]):
        assert probe["httpGet"]["port"] in (PORT, port["name"])
    service = one("Service", "comfy-proxy")
    assert selects(service["spec"]["selector"], pod_labels)
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] in ([(PORT, port["name"])],
                                                                               [(PORT, PORT)])
    pdb = one("PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"].get("minAvailable", 0) < deploy["spec"]["replicas"] or "maxUnavailable" in pdb["spec"]


def pod_env() -> dict[str, str]:
    """The proxy container's environment as the kubelet would set it, Secret references resolved."""
    env = {}
    for item in proxy_container()["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            secret = one("Secret", ref["name"])
            data = secret.get("stringData") or {}
            assert ref["key"] in data, f"{item['name']}: Secret {ref['name']} has no key {ref['key']}"
            env[item["name"]] = data[ref["key"]]
    return env


def strings(node: Any) -> list[str]:
    """The string values of a parsed YAML tree: where the proxy interpolates ${NAME} (not comments)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return []


def test_k8s_config_map_is_a_valid_proxy_config_fed_by_the_secret(tmp_path: Path) -> None:
    spec = proxy_deployment()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts_at = {m["mountPath"]: m["name"] for m in proxy_container()["volumeMounts"]}
    config_dir = str(Path(PROXY_COMMAND[-1]).parent)
    config_map = one("ConfigMap", volumes[mounts_at[config_dir]]["configMap"]["name"])
    text = config_map["data"][Path(PROXY_COMMAND[-1]).name]
    # Every ${NAME} without a default must come from the pod's env (the Secret, for keys).
    needed = {name for value in strings(yaml.safe_load(text))
              for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", value)}
    env = pod_env()
    assert needed and needed <= set(env), f"config needs {needed - set(env)} from the pod's env"
    path = tmp_path / "config.yaml"
    path.write_text(text)
    cfg = load_proxy_config(path, env)
    check_config(path, env)
    assert cfg.server.port == PORT and cfg.server.host == "0.0.0.0"
    assert {t.name for t in cfg.tenants} and all(t.api_keys for t in cfg.tenants)
    # Redis: the URL names the Redis Service and its port, and that Service selects the Redis pods.
    redis_url = urlparse(cfg.store.redis_url)
    redis_service = one("Service", redis_url.hostname)
    assert redis_url.port in [p["port"] for p in redis_service["spec"]["ports"]]
    redis = one("Deployment", redis_url.hostname)
    assert selects(redis_service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    # uploads.dir: a claim every replica can mount at once.
    claim = volumes[mounts_at[cfg.uploads.dir]]["persistentVolumeClaim"]["claimName"]
    assert one("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]


def test_k8s_proxy_gets_the_output_store_from_env_and_its_credentials_from_the_secret(tmp_path: Path) -> None:
    env = {item["name"]: item for item in proxy_container()["env"]}
    for name in ("S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY", "COMFY_PROXY_LINK_SECRET"):
        assert "value" not in env[name], f"{name}: a credential belongs in the Secret, not in the Deployment"
        assert env[name]["valueFrom"]["secretKeyRef"]["key"] == name
    text = one("ConfigMap")["data"][Path(PROXY_COMMAND[-1]).name]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    pod = pod_env()
    cfg = load_proxy_config(path, pod)
    s3 = cfg.outputs.s3
    assert cfg.outputs.store == "s3"
    assert (s3.bucket, s3.endpoint_url, s3.region) == (pod["S3_BUCKET"], pod["S3_ENDPOINT_URL"], pod["S3_REGION"])
    assert (s3.access_key_id, s3.secret_access_key) == (pod["S3_ACCESS_KEY_ID"], pod["S3_SECRET_ACCESS_KEY"])
    assert cfg.outputs.link_secret == pod["COMFY_PROXY_LINK_SECRET"]


def test_k8s_every_claim_and_reference_exists() -> None:
    names = {(o["kind"], o["metadata"]["name"]) for o in k8s_objects()}
    for deploy in (o for o in k8s_objects() if o["kind"] == "Deployment"):
        for volume in deploy["spec"]["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in names
        for container in deploy["spec"]["template"]["spec"]["containers"]:
            assert container["image"], container["name"]
            assert container.get("readinessProbe") and container.get("livenessProbe"), container["name"]
            assert container.get("resources", {}).get("requests"), container["name"]
