"""Records the golden pairs of tests/test_uigraph.py: UI workflows made in the official frontend, and the
prompts the frontend's own `app.graphToPrompt()` makes of them.

A one-off, not a test (the pairs are committed): `.venv/bin/python -m tests.record_uigraph [NAME …]` starts
a simulator and a proxy on free loopback ports, opens the proxy's page in headless Chromium and, for each
graph, builds it with the page's LiteGraph API (or edits the default graph, or loads an API prompt with the
page's own `app.loadApiJson()`, as dropping an API-format file on the editor does), writes `app.graph.serialize()`
as `tests/data/uigraph/<name>.ui.json` (what the editor saves), loads that file back with
`app.loadGraphData()` and writes `(await app.graphToPrompt()).output` as `<name>.api.json`.

The page's `Math.random` returns FIXED_RANDOM while it converts, so `{a|b}` dynamic prompts are recorded
deterministically; the simulator's input folder holds INPUT_FILES, which LoadImage lists, and it offers
CHECKPOINTS. These, and the frontend's version, are written to `recorded.json` beside the pairs for the test
to read (it rebuilds the same object_info).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

from proxy.app import create_app
from proxy.config import BackendConfig, Config, OutputsConfig, StoreConfig
from proxy.logging import configure_logging
from proxy.sim import SimOptions, start_sim
from proxy.sim.images import encode_png, noise_rgb
from proxy.sim.options import DEFAULT_CHECKPOINTS
from tests.cdp import Browser, chromium_binary
from tests.client import start_proxy

DATA = Path(__file__).resolve().parent / "data" / "uigraph"
FIXED_RANDOM = 0.5
INPUT_FILES = ("example.png",)
# The defaults (the default graph picks the first) and the seed workflow's checkpoint, appended.
CHECKPOINTS = (*DEFAULT_CHECKPOINTS, "dreamshaper_8.safetensors")

# The text-to-image prompt of the project's seed document (../shared/seeds/001_f9fcb13e3a62f3ad.txt, beside
# the project root: its cURL example), as written there.
SEED_TEXT_TO_IMAGE: dict[str, Any] = {
    "3": {"inputs": {"seed": 1234, "steps": 20, "cfg": 7, "sampler_name": "euler_ancestral", "scheduler": "normal",
                     "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                     "latent_image": ["5", 0]},
          "class_type": "KSampler"},
    "4": {"inputs": {"ckpt_name": "dreamshaper_8.safetensors"}, "class_type": "CheckpointLoaderSimple"},
    "5": {"inputs": {"width": 512, "height": 512, "batch_size": 1}, "class_type": "EmptyLatentImage"},
    "6": {"inputs": {"text": "beautiful landscape, mountains, lake, sunset, detailed, realistic", "clip": ["4", 1]},
          "class_type": "CLIPTextEncode"},
    "7": {"inputs": {"text": "blurry, bad quality, low resolution, ugly", "clip": ["4", 1]},
          "class_type": "CLIPTextEncode"},
    "8": {"inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "class_type": "VAEDecode"},
    "9": {"inputs": {"filename_prefix": "output", "images": ["8", 0]}, "class_type": "SaveImage"},
}

READY = "window.app && app.graph && window.LiteGraph && LiteGraph.registered_node_types.KSampler"
# Helpers the builders below use, installed in the page once.
HELPERS = """window.rec = {
  node(type, pos, props = {}) {
    const node = LiteGraph.createNode(type);
    if (!node) throw new Error(`no node type ${type}`);
    node.pos = pos; Object.assign(node, props); app.graph.add(node); return node;
  },
  slot(node, name) {
    const index = node.inputs.findIndex(s => s.name === name);
    if (index < 0) throw new Error(`${node.type} has no input ${name}`);
    return index;
  },
  link(from, slot, to, name) { return from.connect(slot, to, typeof name === "number" ? name : rec.slot(to, name)) },
  set(node, name, value) { node.widgets.find(w => w.name === name).value = value },
  id(n) { return app.graph.getNodeById(n) },
};
true"""

# Each builder is the body of an async function that returns the UI graph to record.
# The default graph: 4 checkpoint, 6/7 CLIPTextEncode, 5 EmptyLatentImage, 3 KSampler, 8 VAEDecode, 9 SaveImage.
GRAPHS: dict[str, str] = {
    "text_to_image": "await app.loadGraphData(); return app.graph.serialize();",
    "reroutes_primitives_bypass": """
      await app.loadGraphData();
      const [ks, ckpt, pos, neg, dec, save] = [3, 4, 6, 7, 8, 9].map(rec.id);
      const r1 = rec.node("Reroute", [200, 100]), r2 = rec.node("Reroute", [300, 100]);
      rec.link(ckpt, 0, r1, 0); rec.link(r1, 0, r2, 0); rec.link(r2, 0, ks, "model");
      const r3 = rec.node("Reroute", [300, 300]);
      rec.link(ckpt, 1, r3, 0); rec.link(r3, 0, pos, "clip"); rec.link(r3, 0, neg, "clip");
      const seed = rec.node("PrimitiveNode", [600, 500], {title: "seed"});
      rec.link(seed, 0, ks, "seed"); seed.widgets[0].value = 1234;
      const text = rec.node("PrimitiveNode", [100, 700], {title: "prompt"});
      rec.link(text, 0, pos, "text");
      text.widgets[0].value = "a lighthouse at dusk // mood\\nfilm grain /* lens */, 35mm";
      const adv = rec.node("KSamplerAdvanced", [900, 500]);  // bypassed: LATENT passes from input 3, not 0
      rec.link(ks, 0, adv, "latent_image"); rec.link(adv, 0, dec, "samples"); adv.mode = 4;
      const invert = rec.node("ImageInvert", [1300, 400]);
      rec.link(dec, 0, invert, "image"); rec.link(invert, 0, save, "images"); invert.mode = 4;
      const muted = rec.node("PreviewImage", [1300, 600]); rec.link(dec, 0, muted, "images"); muted.mode = 2;
      const blur = rec.node("ImageBlur", [1300, 800]); rec.link(dec, 0, blur, "image"); blur.mode = 2;
      const shown = rec.node("PreviewImage", [1500, 800]); rec.link(blur, 0, shown, "images");
      rec.node("Note", [0, 0]).widgets[0].value = "bypassed and muted nodes on purpose";
      rec.node("MarkdownNote", [0, 200]).widgets[0].value = "# farm test";
      ks.title = "Sampler (farm)";
      rec.set(save, "filename_prefix", "farm_%EmptyLatentImage.width%x%Empty Latent Image.height%");
      return app.graph.serialize();""",
    "subgraph": """
      await app.loadGraphData();
      const {subgraph, node} = app.graph.convertToSubgraph(new Set([rec.id(6), rec.id(7)]));
      const inner = subgraph.getNodeById(6);
      subgraph.addInput("positive_text", "STRING").connect(inner.inputs[rec.slot(inner, "text")], inner);
      node.widgets.find(w => w.name === "positive_text").value = "a farm /* of */ GPUs // raw";
      node.title = "Prompts";
      return app.graph.serialize();""",
    "subgraph_nested": """
      await app.loadGraphData();
      const sampling = app.graph.convertToSubgraph(new Set([rec.id(3), rec.id(8)]));
      app.graph.convertToSubgraph(new Set([sampling.node, rec.id(5)]));
      return app.graph.serialize();""",
    "subgraph_muted_and_bypassed": """
      await app.loadGraphData();
      app.graph.convertToSubgraph(new Set([rec.id(6)])).node.mode = 2;
      app.graph.convertToSubgraph(new Set([rec.id(7)])).node.mode = 4;
      return app.graph.serialize();""",
    # Two instances of each of two subgraphs: one definition, widget values of each instance, ids per instance.
    "subgraph_twice": """
      await app.loadGraphData();
      const prompt = app.graph.convertToSubgraph(new Set([rec.id(6)]));
      const inner = prompt.subgraph.getNodeById(6);
      prompt.subgraph.addInput("text", "STRING").connect(inner.inputs[rec.slot(inner, "text")], inner);
      const negative = prompt.node.clone(); negative.pos = [100, 900]; app.graph.add(negative);
      rec.link(rec.id(4), 1, negative, "clip"); rec.link(negative, 0, rec.id(3), "negative");
      app.graph.remove(rec.id(7));
      negative.widgets.find(w => w.name === "text").value = "blurry";
      const invert = rec.node("ImageInvert", [1300, 400]);
      rec.link(rec.id(8), 0, invert, "image"); rec.link(invert, 0, rec.id(9), "images");
      const first = app.graph.convertToSubgraph(new Set([invert])).node;
      const second = first.clone(); second.pos = [1300, 700]; app.graph.add(second);
      rec.link(first, 0, second, 0); rec.link(second, 0, rec.id(9), "images");
      // The editor shows one value in both instances; a file may still hold one per instance.
      const ui = app.graph.serialize();
      ui.nodes.find(n => n.id === prompt.node.id).widgets_values = ["a castle on a hill"];
      return ui;""",
    # Widgets promoted to the subgraph node, reordered in its panel, one fed by a PrimitiveNode outside.
    "subgraph_promoted_widgets": """
      await app.loadGraphData();
      const {subgraph, node} = app.graph.convertToSubgraph(new Set([rec.id(3), rec.id(6)]));
      const sampler = subgraph.getNodeById(3), positive = subgraph.getNodeById(6);
      for (const [inner, name] of [[sampler, "seed"], [sampler, "steps"], [positive, "text"], [sampler, "cfg"]])
        subgraph.addInput(name, inner.inputs[rec.slot(inner, name)].type).connect(
          inner.inputs[rec.slot(inner, name)], inner);
      const seed = rec.node("PrimitiveNode", [0, 900]); rec.link(seed, 0, node, "seed"); seed.widgets[0].value = 999;
      rec.set(node, "steps", 12); rec.set(node, "text", "promoted text"); rec.set(node, "cfg", 4.5);
      node.properties.proxyWidgets = [...node.properties.proxyWidgets].reverse();
      return app.graph.serialize();""",
    "image_to_image": """
      await app.loadGraphData();
      const [ks, ckpt, pos, neg, latent, dec, save] = [3, 4, 6, 7, 5, 8, 9].map(rec.id);
      const load = rec.node("LoadImage", [0, 700]); rec.set(load, "image", "example.png");
      const scale = rec.node("ImageScale", [200, 700]); rec.link(load, 0, scale, "image");
      rec.set(scale, "upscale_method", "lanczos"); rec.set(scale, "width", 768); rec.set(scale, "crop", "center");
      const encode = rec.node("VAEEncode", [400, 700]);
      rec.link(scale, 0, encode, "pixels"); rec.link(ckpt, 2, encode, "vae");
      const lora = rec.node("LoraLoader", [200, 400]);
      rec.link(ckpt, 0, lora, "model"); rec.link(ckpt, 1, lora, "clip");
      rec.set(lora, "lora_name", "add_detail.safetensors"); rec.set(lora, "strength_model", 0.75);
      rec.link(lora, 1, pos, "clip"); rec.link(lora, 1, neg, "clip");
      const adv = rec.node("KSamplerAdvanced", [800, 400]);
      rec.link(lora, 0, adv, "model"); rec.link(pos, 0, adv, "positive"); rec.link(neg, 0, adv, "negative");
      rec.link(encode, 0, adv, "latent_image"); rec.link(adv, 0, dec, "samples");
      rec.set(adv, "noise_seed", 42); rec.set(adv, "end_at_step", 15); rec.set(adv, "scheduler", "karras");
      app.graph.remove(ks); app.graph.remove(latent);
      const blur = rec.node("ImageBlur", [1300, 400]);
      rec.link(dec, 0, blur, "image"); rec.link(blur, 0, save, "images");
      rec.set(blur, "blur_radius", 3); rec.set(blur, "sigma", 0.5);
      const prefix = rec.node("PrimitiveNode", [1300, 600], {title: "prefix"});
      rec.link(prefix, 0, save, "filename_prefix");
      prefix.widgets[0].value = "i2i_%KSamplerAdvanced.steps%_%LoRA.strength_model%";
      prefix.properties["Run widget replace on values"] = true;
      lora.title = "LoRA";
      const empty = rec.node("EmptyImage", [0, 1000]); rec.set(empty, "color", 16711680);
      rec.link(empty, 0, rec.node("PreviewImage", [200, 1000]), "images");
      return app.graph.serialize();""",
    # A file as older editors saved it, edited by hand: unlinked widget inputs left out of `inputs`, a
    # `sample_` sampler name, `widgets_values` as an object (ignored: defaults), none at all, a URL and
    # `{a|b}` choices in a dynamic prompt.
    "legacy_quirks": """
      await app.loadGraphData();
      const ui = app.graph.serialize();
      for (const node of ui.nodes) node.inputs = node.inputs.filter(i => !i.widget || i.link != null);
      const find = id => ui.nodes.find(n => n.id === id);
      find(3).widgets_values[4] = "sample_dpmpp_2m";
      find(5).widgets_values = {width: 768, height: 768, batch_size: 2};
      delete find(9).widgets_values;
      find(6).widgets_values = ["a {red|green|blue} {car|{old|new} boat}\\\\, \\\\{not\\\\}\\nsee http://example.com/x"];
      return ui;""",
    # Links no editor would draw, written into the file: a muted node into a widget input (input and value
    # both go), a bypassed node with no input of the wanted type (the input goes), a stale target slot,
    # and a linked input the node's definition does not have (it is sent as is).
    "hand_edited_links": """
      await app.loadGraphData();
      const ui = app.graph.serialize();
      const find = id => ui.nodes.find(n => n.id === id);
      ui.nodes.push({id: 20, type: "EmptyLatentImage", pos: [0, 900], size: [315, 106], flags: {}, order: 7,
                     mode: 2, inputs: [], outputs: [{name: "LATENT", type: "LATENT", links: [20]}],
                     properties: {}, widgets_values: [64, 64, 1]});
      ui.links.push([20, 20, 0, 3, 5, "INT"]);
      find(3).inputs.find(i => i.name === "steps").link = 20;
      find(6).mode = 4;
      ui.links.find(l => l[0] === 2)[4] = 9;
      ui.links.push([21, 4, 0, 3, 10, "MODEL"]);
      find(3).inputs.push({name: "extra_model", type: "MODEL", link: 21});
      find(4).outputs[0].links.push(21);
      ui.last_link_id = 21; ui.last_node_id = 20;
      return ui;""",
    # The seed's API prompt loaded as the editor loads a dropped API-format file (frontend 1.32.9:
    # `app.loadApiJson(apiData, fileName)`, synchronous; it shows a dialog and loads nothing if a class is
    # missing), then saved.
    "seed_text_to_image": """
      app.loadApiJson(SEED, "seed_text_to_image.json");
      await new Promise(resolve => setTimeout(resolve, 100));  // its afterLoadNewGraph is not awaited
      if (app.graph.nodes.length !== Object.keys(SEED).length) throw new Error("the seed prompt did not load");
      return app.graph.serialize();""".replace("SEED", json.dumps(SEED_TEXT_TO_IMAGE)),
}
CONVERT = """(async () => {
  const ui = await (async () => { BUILD })();
  await app.loadGraphData(ui);
  const random = Math.random;
  Math.random = () => FIXED_RANDOM;
  try {
    return {ui, api: (await app.graphToPrompt()).output};
  } finally {
    Math.random = random;
  }
})()"""


async def record(names: list[str], out: Path) -> None:
    """Start the farm and the page, then write each named pair to `out`."""
    with tempfile.TemporaryDirectory(prefix="record-uigraph-") as tmp:
        base = Path(tmp)
        (base / "sim" / "input").mkdir(parents=True)
        for name in INPUT_FILES:
            (base / "sim" / "input" / name).write_bytes(encode_png(8, 8, noise_rgb(8, 8, 1)))
        sim = await start_sim(SimOptions(name="recorder", port=0, base_dir=str(base / "sim"), step_ms=5,
                                         checkpoints=CHECKPOINTS))
        config = Config(backends=(BackendConfig(name="recorder", url=sim.url),), store=StoreConfig(),
                        outputs=OutputsConfig(dir=str(base / "outputs")))
        proxy = await start_proxy(create_app(config))
        browser = await Browser.start(chromium_binary() or "chromium", base / "profile")
        try:
            page = await browser.new_page()
            await page.send("Page.navigate", url=proxy.url + "/")
            await page.wait_for(READY, 60, "the frontend to register the farm's nodes")
            await page.evaluate(HELPERS)
            for name in names:
                script = CONVERT.replace("BUILD", GRAPHS[name]).replace("FIXED_RANDOM", repr(FIXED_RANDOM))
                write(out, name, await page.evaluate(script, timeout=60))
            if page.console_errors:
                print("page errors:", *page.console_errors, sep="\n  ", file=sys.stderr)
        finally:
            await browser.close()
            await proxy.close()
            await sim.close()


def write(out: Path, name: str, pair: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for kind in ("ui", "api"):
        (out / f"{name}.{kind}.json").write_text(json.dumps(pair[kind], indent=2, ensure_ascii=False) + "\n")
    print(f"{name}: {len(pair['ui']['nodes'])} UI nodes -> {len(pair['api'])} prompt nodes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"some of {', '.join(GRAPHS)} (default: all)")
    parser.add_argument("--out", type=Path, default=DATA)
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(GRAPHS))
    if unknown:
        parser.error(f"no graph named {unknown[0]}")
    if chromium_binary() is None:
        sys.exit("record_uigraph needs Chromium (`chromium` on PATH)")
    print(f"comfyui-frontend-package {version('comfyui-frontend-package')}")
    configure_logging("warning")
    asyncio.run(record(args.names or list(GRAPHS), args.out))
    conditions = {"frontend": version("comfyui-frontend-package"), "fixed_random": FIXED_RANDOM,
                  "input_files": list(INPUT_FILES), "checkpoints": list(CHECKPOINTS)}
    (args.out / "recorded.json").write_text(json.dumps(conditions, indent=2) + "\n")


if __name__ == "__main__":
    main()
