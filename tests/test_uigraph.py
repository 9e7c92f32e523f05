"""UI workflows (what the ComfyUI editor saves) become the prompt the official frontend would queue.

The golden pairs in tests/data/uigraph were recorded once from comfyui-frontend-package's own
`app.graphToPrompt()` by tests/record_uigraph.py, over the simulator's object_info, which these tests
compute the same way (no browser, no network); `seed_text_to_image` is the seed document's API prompt
loaded into the editor and saved, so its pair shows the UI round trip keeps that workflow. Then: how a
document's format is told, and what cannot be converted, each refused with the node named.
"""

from __future__ import annotations

import copy
import json
import random
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.comfy.frontend import REQUIRED_VERSION
from proxy.comfy.uigraph import UiGraphError, dynamic_prompt, format_date, graph_to_api, workflow_format
from proxy.sim.nodes import object_info
from proxy.sim.options import SimOptions

DATA = Path(__file__).resolve().parent / "data" / "uigraph"
RECORDED = json.loads((DATA / "recorded.json").read_text())
PAIRS = sorted(path.name.removesuffix(".ui.json") for path in DATA.glob("*.ui.json"))


class FixedRandom(random.Random):
    """The page's Math.random while the pairs were recorded."""

    def random(self) -> float:
        return float(RECORDED["fixed_random"])


@pytest.fixture(scope="module")
def farm_info(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The simulator's object_info with the input files and checkpoints the recording's simulator had."""
    inputs = tmp_path_factory.mktemp("input")
    for name in RECORDED["input_files"]:
        (inputs / name).write_bytes(b"")
    return object_info(SimOptions(checkpoints=tuple(RECORDED["checkpoints"])), str(inputs))


def load(name: str, kind: str = "ui") -> Any:
    return json.loads((DATA / f"{name}.{kind}.json").read_text())


def text_to_image() -> dict[str, Any]:
    """A fresh copy of the editor's default graph: 3 KSampler, 4 checkpoint, 5 latent, 6/7 text, 8 decode, 9 save."""
    return copy.deepcopy(load("text_to_image"))


def node(graph: dict[str, Any], node_id: int) -> dict[str, Any]:
    return next(n for n in graph["nodes"] if n["id"] == node_id)


def test_the_pairs_were_recorded_from_the_pinned_frontend() -> None:
    """A new pin of comfyui-frontend-package means recording again (and reading its graphToPrompt)."""
    assert RECORDED["frontend"] == REQUIRED_VERSION
    assert {"text_to_image", "reroutes_primitives_bypass", "subgraph", "seed_text_to_image"} <= set(PAIRS)


def test_the_farm_offers_what_the_recording_offered(farm_info: dict[str, Any]) -> None:
    """The default graph picks the first checkpoint; the seed workflow names dreamshaper_8."""
    names = farm_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert names == RECORDED["checkpoints"]
    assert names[0] == "sd_xl_base_1.0.safetensors" and "dreamshaper_8.safetensors" in names
    assert farm_info["LoadImage"]["input"]["required"]["image"][0] == RECORDED["input_files"]


@pytest.mark.parametrize("name", PAIRS)
def test_a_ui_workflow_becomes_exactly_the_prompt_the_frontend_makes(name: str, farm_info: dict[str, Any]) -> None:
    prompt = graph_to_api(load(name), farm_info, rng=FixedRandom())
    assert prompt == load(name, "api")
    # Same key order too, at every level: the page's JSON and ours read the same.
    assert json.dumps(prompt) == json.dumps(load(name, "api"))


# The text-to-image prompt of the seed document (../shared/seeds/001_f9fcb13e3a62f3ad.txt), typed again here.
SEED_TEXT_TO_IMAGE = {
    "3": {"class_type": "KSampler",
          "inputs": {"seed": 1234, "steps": 20, "cfg": 7, "sampler_name": "euler_ancestral", "scheduler": "normal",
                     "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                     "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "dreamshaper_8.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode",
          "inputs": {"text": "beautiful landscape, mountains, lake, sunset, detailed, realistic", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode",
          "inputs": {"text": "blurry, bad quality, low resolution, ugly", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "output", "images": ["8", 0]}},
}


def test_the_seed_workflow_survives_the_round_trip_through_the_editor(farm_info: dict[str, Any]) -> None:
    """Loaded into the editor with its own API loader, saved, and converted back: the same classes, links and
    values (numbers of the same JSON type too), only the editor's `_meta` titles added."""
    prompt = graph_to_api(load("seed_text_to_image"), farm_info)
    without_meta = {node_id: {k: v for k, v in entry.items() if k != "_meta"} for node_id, entry in prompt.items()}
    assert without_meta == SEED_TEXT_TO_IMAGE
    # Written out, 7 is not 7.0 nor "4" 4: the JSON types are the seed's too.
    assert json.dumps(without_meta, sort_keys=True) == json.dumps(SEED_TEXT_TO_IMAGE, sort_keys=True)


def test_links_saved_as_objects_read_as_links_saved_as_lists(farm_info: dict[str, Any]) -> None:
    """The editor's newer schema (version 1) writes links as objects, as subgraph definitions always do."""
    graph = load("reroutes_primitives_bypass")
    fields = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    graph["links"] = [dict(zip(fields, link, strict=True)) for link in graph["links"]]
    assert graph_to_api(graph, farm_info) == load("reroutes_primitives_bypass", "api")


def test_converting_leaves_the_workflow_as_it_was(farm_info: dict[str, Any]) -> None:
    workflow = load("reroutes_primitives_bypass")
    graph_to_api(workflow, farm_info)
    assert workflow == load("reroutes_primitives_bypass")


@pytest.mark.parametrize("name", PAIRS)
def test_recorded_files_are_told_apart_by_format(name: str) -> None:
    assert workflow_format(load(name)) == "ui"
    assert workflow_format(load(name, "api")) == "api"


@pytest.mark.parametrize("document", [None, [], "text", {}, {"nodes": {}}, {"3": {"inputs": {}}},
                                      {"nodes": [], "links": {}}, {"3": "KSampler"}])
def test_anything_else_is_neither_format(document: Any) -> None:
    assert workflow_format(document) is None


def test_an_api_prompt_is_not_converted(farm_info: dict[str, Any]) -> None:
    with pytest.raises(UiGraphError, match="not a UI workflow"):
        graph_to_api(load("text_to_image", "api"), farm_info)


def refusal(graph: dict[str, Any], info: dict[str, Any]) -> UiGraphError:
    with pytest.raises(UiGraphError) as caught:
        graph_to_api(graph, info)
    assert isinstance(caught.value, ValueError)
    return caught.value


def test_a_node_class_the_farm_lacks_is_refused_by_node(farm_info: dict[str, Any]) -> None:
    graph = text_to_image()
    node(graph, 8)["type"] = "VAEDecodeTiled"
    error = refusal(graph, farm_info)
    assert error.node_id == "8"
    assert str(error) == "node 8: no node class 'VAEDecodeTiled' on this farm"


def test_a_link_from_a_node_that_is_not_there_is_refused(farm_info: dict[str, Any]) -> None:
    graph = text_to_image()
    graph["links"] = [[*link[:1], 99, *link[2:]] if link[0] == 9 else link for link in graph["links"]]
    error = refusal(graph, farm_info)
    assert error.node_id == "9"
    assert str(error) == "node 9: input 'images' is linked to node 99, which is not in the graph"


def test_an_input_naming_a_link_that_is_not_there_is_refused(farm_info: dict[str, Any]) -> None:
    graph = text_to_image()
    graph["links"] = [link for link in graph["links"] if link[0] != 7]
    error = refusal(graph, farm_info)
    assert (error.node_id, str(error)) == ("8", "node 8: input 'samples' names link 7, which is not in the graph")


def test_links_in_a_circle_are_refused(farm_info: dict[str, Any]) -> None:
    graph = text_to_image()
    reroutes = [{"id": i, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": link}],
                 "outputs": [{"name": "", "type": "*", "links": [out]}]}
                for i, link, out in ((20, 21, 20), (21, 20, 21))]
    graph["nodes"] += reroutes
    graph["links"] += [[20, 20, 0, 21, 0, "*"], [21, 21, 0, 20, 0, "*"], [22, 21, 0, 8, 1, "VAE"]]
    node(graph, 8)["inputs"][1]["link"] = 22
    assert "links go round in a circle" in str(refusal(graph, farm_info))


def test_a_legacy_group_node_is_refused_with_what_to_do(farm_info: dict[str, Any]) -> None:
    graph = text_to_image()
    node(graph, 8)["type"] = "workflow>decode"
    graph["extra"]["groupNodes"] = {"decode": {"nodes": []}}
    assert "convert it to a subgraph in the editor" in str(refusal(graph, farm_info))


@pytest.mark.parametrize(("kind", "says"), [("WebcamCapture", "made by the web page"),
                                             ("CustomCamera", "a WEBCAM widget, which only the web page fills")])
def test_a_node_whose_value_the_page_makes_is_refused(kind: str, says: str, farm_info: dict[str, Any]) -> None:
    info = {**farm_info, kind: {**farm_info["LoadImage"], "name": kind,
                                "input": {"required": {"image": ["WEBCAM", {}]}}}}
    graph = text_to_image()
    node(graph, 4)["type"] = kind
    error = refusal(graph, info)
    assert error.node_id == "4" and says in str(error)


def test_a_primitive_node_inside_a_subgraph_is_refused(farm_info: dict[str, Any]) -> None:
    """Frontend 1.32.9 throws a TypeError on it: it looks the primitive's links up in the root graph."""
    graph = load("subgraph")
    definition = graph["definitions"]["subgraphs"][0]
    inner = next(n for n in definition["nodes"] if n["id"] == 6)
    inner["inputs"][1]["link"] = 40
    definition["nodes"].append({"id": 30, "type": "PrimitiveNode", "mode": 0, "inputs": [],
                                "outputs": [{"name": "STRING", "type": "STRING", "links": [40]}],
                                "widgets_values": ["from a primitive"]})
    definition["links"].append({"id": 40, "origin_id": 30, "origin_slot": 0, "target_id": 6, "target_slot": 1,
                                "type": "STRING"})
    error = refusal(graph, farm_info)
    assert error.node_id == f"{graph['nodes'][-1]['id']}:30" and "PrimitiveNode inside a subgraph" in str(error)


def test_a_subgraph_that_contains_itself_is_refused(farm_info: dict[str, Any]) -> None:
    graph = load("subgraph")
    definition = graph["definitions"]["subgraphs"][0]
    definition["nodes"].append({"id": 30, "type": definition["id"], "mode": 0})
    assert "contains itself" in str(refusal(graph, farm_info))


def test_a_node_without_an_id_is_refused(farm_info: dict[str, Any]) -> None:
    graph = text_to_image()
    del node(graph, 5)["id"]
    assert "a node without an id" in str(refusal(graph, farm_info))


def test_widget_values_fill_widgets_in_object_info_order_skipping_control_widgets(farm_info: dict[str, Any]) -> None:
    graph = text_to_image()
    node(graph, 3)["widgets_values"] = [7, "fixed", 30, 6.5, "dpmpp_2m", "karras", 0.6]
    inputs = graph_to_api(graph, farm_info)["3"]["inputs"]
    assert {k: inputs[k] for k in ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")} == {
        "seed": 7, "steps": 30, "cfg": 6.5, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 0.6}


def test_missing_widget_values_are_the_defaults(farm_info: dict[str, Any]) -> None:
    graph = text_to_image()
    node(graph, 3)["widgets_values"] = [7]
    inputs = graph_to_api(graph, farm_info)["3"]["inputs"]
    assert (inputs["steps"], inputs["cfg"], inputs["sampler_name"], inputs["denoise"]) == (20, 8.0, "euler", 1.0)


def test_a_list_value_is_wrapped_so_it_is_not_read_as_a_link(farm_info: dict[str, Any]) -> None:
    graph = text_to_image()
    node(graph, 5)["widgets_values"] = [["4", 0], 512, 1]
    assert graph_to_api(graph, farm_info)["5"]["inputs"]["width"] == {"__value__": ["4", 0]}


def test_integers_past_double_precision_are_rounded_as_the_page_parses_them(farm_info: dict[str, Any]) -> None:
    graph = text_to_image()
    node(graph, 3)["widgets_values"][0] = 2**64 - 1
    assert graph_to_api(graph, farm_info)["3"]["inputs"]["seed"] == 2**64


def test_the_date_in_a_save_nodes_prefix_is_the_time_of_conversion(farm_info: dict[str, Any]) -> None:
    graph = text_to_image()
    node(graph, 9)["widgets_values"] = ["%date:yyyy-MM-dd%/%date:hh.mm%/%date:h-m-s%_%KSampler.steps%_%width%"]
    prompt = graph_to_api(graph, farm_info, now=datetime(2026, 3, 7, 9, 5, 4))
    # "%date:hh.mm%" splits at the dot into node "date:hh", widget "mm": no such node, kept as written.
    assert prompt["9"]["inputs"]["filename_prefix"] == "2026-03-07/%date:hh.mm%/9-5-4_20_%width%"


def test_numbers_in_a_prefix_are_written_as_javascript_writes_them(farm_info: dict[str, Any]) -> None:
    graph = text_to_image()
    node(graph, 3)["widgets_values"][3:] = [8.0, "euler", "normal", 1e-07]
    node(graph, 9)["widgets_values"] = ["%KSampler.cfg%_%KSampler.denoise%_%Load Checkpoint.ckpt_name%"]
    assert graph_to_api(graph, farm_info)["9"]["inputs"]["filename_prefix"] == "8_1e-7_sd_xl_base_1.0.safetensors"


def test_dynamic_prompts_pick_one_choice_each_time() -> None:
    class Last(random.Random):
        def random(self) -> float:
            return 0.99
    assert dynamic_prompt("a {cat|dog|{red|blue} fox} // comment", Last()) == "a blue fox "
    assert dynamic_prompt("/* all */\\{kept\\} \\| {one}", Last()) == "{kept} | one"


# Text with none of dynamic prompts' syntax (braces, escapes, comments) and no \r, which a <textarea> changes.
PLAIN_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="{}\\/\r"))


@given(PLAIN_TEXT)
def test_text_without_dynamic_syntax_is_sent_as_written(text: str) -> None:
    assert dynamic_prompt(text, random.Random(0)) == text


@given(st.integers(min_value=0, max_value=2**53), PLAIN_TEXT)
def test_any_seed_and_prompt_reach_their_node(seed: int, text: str) -> None:
    info = object_info(SimOptions(), "/nonexistent")
    graph = text_to_image()
    node(graph, 3)["widgets_values"][0] = seed
    node(graph, 6)["widgets_values"] = [text]
    prompt = graph_to_api(graph, info)
    assert prompt["3"]["inputs"]["seed"] == seed
    assert prompt["6"]["inputs"]["text"] == text


@pytest.mark.parametrize(("pattern", "expected"), [("yyyy-MM-dd", "2026-03-07"), ("yy/M/d", "26/3/7"),
                                                    ("hh:mm:ss", "09:05:04"), ("yyy", "yyy")])
def test_dates_are_formatted_as_the_frontend_does(pattern: str, expected: str) -> None:
    assert format_date(pattern, datetime(2026, 3, 7, 9, 5, 4)) == expected
