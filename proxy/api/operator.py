"""The operator page at `/proxy/`: the farm at a glance for operators without Grafana, as HAProxy's stats
page or RabbitMQ's management page are. Server-rendered HTML with no build step: the page itself is a
static shell (open, as a browser cannot send a key when it navigates); its tables come from
`/proxy/ui/farm`, an HTML fragment rendered here for an admin, fetched every 2 s with the key the operator
gave (kept in the tab's sessionStorage, or passed as `#key=…`). Its buttons call the admin routes:
drain, undrain, remove a backend, add one.
"""

from __future__ import annotations

import html
import time
from typing import Any

from aiohttp import web

from proxy.api.admin import require_admin
from proxy.api.context import services
from proxy.jobs import job
from proxy.sampler import tenant_label

LATEST_JOBS = 20
REFRESH_MS = 2000


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _vram_bar(free: int, total: int) -> str:
    if not total:
        return "<span class=muted>unknown</span>"
    used = max(0, min(100, round(100 * (total - free) / total)))
    return (f'<div class=bar title="{_mib(total - free)} of {_mib(total)} used"><div style="width:{used}%">'
            f"</div></div> {_mib(free)} free")


def _state(item: dict[str, Any]) -> str:
    if item["draining"]:
        return "draining"
    return "available" if item["available"] else ("down" if not item["healthy"] else "unavailable")


def _backend_row(item: dict[str, Any], inflight: int, speed: dict[str, float] | None) -> str:
    name = _e(item["name"])
    step = f"{speed['per_step'] * 1000:.0f} ms/step" if speed and "per_step" in speed else "<span class=muted>—</span>"
    toggle = ("undrain", "Undrain") if item["draining"] else ("drain", "Drain")
    return (f'<tr data-backend="{name}" class="{_state(item)}"><td>{name}<div class=muted>{_e(item["url"])}</div>'
            f"</td><td class=state>{_state(item)}</td><td>{_e(item['circuit'])}</td>"
            f"<td>{inflight} / {item['max_inflight']}</td><td>{item['queue_remaining']}</td>"
            f"<td>{_vram_bar(item['vram_free'], item['vram_total'])}</td>"
            f"<td>{_e(', '.join(item['labels'])) or '<span class=muted>default</span>'}</td><td>{step}</td>"
            f'<td><button data-action="{toggle[0]}" data-name="{name}">{toggle[1]}</button> '
            f'<button data-action="remove" data-name="{name}">Remove</button></td></tr>')


async def farm_fragment(request: web.Request) -> web.Response:
    """`GET /proxy/ui/farm` (admin): the page's tables, rendered."""
    require_admin(request)
    svc = services(request)
    inflight = await svc.store.inflight()
    speeds = await svc.store.shared_speeds()
    rows = "".join(_backend_row(state.describe(), len(inflight.get(state.name, ())), speeds.get(state.name))
                   for state in sorted(svc.farm.snapshot(), key=lambda s: s.name))
    queued = await svc.store.queue_summary()
    now = time.time()
    queue_rows = "".join(f"<tr><td>{_e(tenant_label(t))}</td><td>{n}</td><td>{max(now - oldest, 0):.0f} s</td></tr>"
                         for t, (n, oldest) in sorted(queued.items()))
    active = [pid for ids in inflight.values() for pid in ids]
    recent = await svc.store.history_tail(LATEST_JOBS)   # every 2 s per open page: no scan of all history
    records = await svc.store.get_many([*await svc.store.queued(LATEST_JOBS), *active, *recent])
    job_rows = "".join(f"<tr><td>{_e(rec.prompt_id)}</td><td>{_e(tenant_label(rec.tenant))}</td>"
                       f"<td class=job-{_e(status)}>{_e(status)}</td><td>{_e(rec.backend or '')}</td></tr>"
                       for rec in records[:3 * LATEST_JOBS] for status in [job(rec)["status"]])
    body = (f"<section><h2>Backends ({len(svc.farm.snapshot())})</h2><table id=backends><thead><tr><th>backend</th>"
            "<th>state</th><th>circuit</th><th>running / slots</th><th>its queue</th><th>VRAM</th><th>labels</th>"
            f"<th>learned speed</th><th></th></tr></thead><tbody>{rows}</tbody></table></section>"
            "<section><h2>Queue by tenant</h2><table id=queue><thead><tr><th>tenant</th><th>waiting</th>"
            f"<th>oldest</th></tr></thead><tbody>{queue_rows or '<tr><td colspan=3 class=muted>empty</td></tr>'}"
            "</tbody></table></section><section><h2>Latest jobs</h2><table id=jobs><thead><tr><th>job</th>"
            f"<th>tenant</th><th>status</th><th>backend</th></tr></thead><tbody>{job_rows}</tbody></table></section>")
    return web.Response(text=body, content_type="text/html", headers={"Cache-Control": "no-store"})


PAGE = """<!doctype html>
<html lang=en><head><meta charset=utf-8><title>comfy-farm-proxy</title>
<meta name=viewport content="width=device-width, initial-scale=1">
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1em; } th, td { padding: .3em .7em; text-align: left; }
th { border-bottom: 2px solid #ccc; } tr { border-bottom: 1px solid #eee; }
.muted { color: #888; font-size: 90%; } .draining .state { color: #b60; } .down .state { color: #c00; }
.available .state { color: #080; } .bar { display: inline-block; width: 80px; height: 8px; background: #ddf; }
.bar div { height: 100%; background: #46c; } #error { color: #c00; } form { margin: 1em 0; }
</style></head>
<body><h1>comfy-farm-proxy</h1>
<form id=key hidden><label>Admin API key <input type=password name=key autocomplete=off></label>
<button>Use</button></form>
<p id=error></p><div id=farm>Loading…</div>
<form id=add><b>Add a backend</b> <input name=url placeholder="http://gpu-host:8188" required>
<input name=name placeholder="name (optional)"> <input name=labels placeholder="labels, comma-separated">
<button>Add</button></form>
<script>
const hash = new URLSearchParams(location.hash.slice(1));
if (hash.get("key")) {
  sessionStorage.setItem("comfyProxyKey", hash.get("key"));
  history.replaceState(null, "", location.pathname);   // the key leaves the address bar and the history
}
const key = () => sessionStorage.getItem("comfyProxyKey") || "";
const base = location.pathname.replace(/\\/proxy\\/?$/, "");
async function call(method, path, body) {
  const r = await fetch(base + path, {method, headers: {"X-API-Key": key(), "Content-Type": "application/json"},
                                      body: body === undefined ? undefined : JSON.stringify(body)});
  if (r.status === 401 || r.status === 403) { document.getElementById("key").hidden = false; }
  if (!r.ok) { const t = await r.text(); throw new Error(r.status + " " + t.slice(0, 300)); }
  return r;
}
async function refresh() {
  try {
    const r = await call("GET", "/proxy/ui/farm");
    document.getElementById("farm").innerHTML = await r.text();
    document.getElementById("error").textContent = "";
  } catch (e) { document.getElementById("error").textContent = e.message; }
}
document.getElementById("farm").addEventListener("click", async (ev) => {
  const b = ev.target.closest("button[data-action]"); if (!b) return;
  const name = encodeURIComponent(b.dataset.name), action = b.dataset.action;
  try {
    if (action === "remove") { if (!confirm("Remove " + b.dataset.name + "? It drains first.")) return;
                               await call("DELETE", "/proxy/backends/" + name); }
    else await call("POST", "/proxy/backends/" + name + "/" + action, {});
  } catch (e) { document.getElementById("error").textContent = e.message; }
  refresh();
});
document.getElementById("add").addEventListener("submit", async (ev) => {
  ev.preventDefault(); const f = new FormData(ev.target), body = {url: f.get("url")};
  if (f.get("name")) body.name = f.get("name");
  const labels = (f.get("labels") || "").split(",").map(s => s.trim()).filter(Boolean);
  if (labels.length) body.labels = labels;
  try { await call("POST", "/proxy/backends", body); ev.target.reset(); }
  catch (e) { document.getElementById("error").textContent = e.message; }
  refresh();
});
document.getElementById("key").addEventListener("submit", (ev) => {
  ev.preventDefault(); sessionStorage.setItem("comfyProxyKey", new FormData(ev.target).get("key"));
  ev.target.hidden = true; refresh();
});
refresh(); setInterval(refresh, REFRESH_MS);
</script></body></html>
""".replace("REFRESH_MS", str(REFRESH_MS))


async def page(request: web.Request) -> web.Response:
    """`GET /proxy/`: the shell; nothing of the farm is in it."""
    return web.Response(text=PAGE, content_type="text/html",
                        headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                 "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                                            "style-src 'unsafe-inline'; frame-ancestors 'none'"})
