"""Acceptance of the README's first command: `comfy-proxy demo` as a process, driven by the Python
snippets of the ComfyUI API documents (shared/seeds), unchanged but for the server address.

Every Python snippet of the seeds is here: the documentation suite's "Example Integration Flow"
(requests), the quick reference's `queue_prompt`/`get_image`/`get_history`, `wait_for_result`,
`download_images` and its Flask middleware (run with Flask's test client), plus ComfyUI's own
websocket example (`get_image_full`). Two are not clients of the API and are left out: the quick
reference's `logging.basicConfig` line, and the API reference's "Python SDK" (`pip install
comfyui-client`), which names a package that PyPI does not have."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket  # websocket-client, what ComfyUI's own websockets_api_example.py uses

from tests.conftest import free_port


@pytest.fixture(scope="module")
def demo_server() -> Iterator[str]:
    port = free_port()
    exe = Path(sys.executable).with_name("comfy-proxy")
    proc = subprocess.Popen([str(exe), "demo", "--port", str(port), "--step-ms", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    for line in proc.stdout:
        if "demo ready" in line:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("demo did not start")
    else:
        pytest.fail(f"demo exited with {proc.wait()}")
    yield f"127.0.0.1:{port}"
    proc.terminate()
    assert proc.wait(timeout=20) == 0


# --- the snippets, as the documents give them --------------------------------------------------------
def queue_prompt(prompt, server="127.0.0.1:8188", client_id=None):  # type: ignore[no-untyped-def]
    p = {"prompt": prompt}
    if client_id:
        p["client_id"] = client_id
    data = json.dumps(p).encode("utf-8")
    req = urllib.request.Request(f"http://{server}/prompt", data=data)
    return json.loads(urllib.request.urlopen(req).read())


def get_image(filename, server="127.0.0.1:8188"):  # type: ignore[no-untyped-def]
    url = f"http://{server}/view?filename={filename}&type=output"
    with urllib.request.urlopen(url) as response:
        return response.read()


def get_image_full(filename, subfolder, folder_type, server="127.0.0.1:8188"):  # type: ignore[no-untyped-def]
    data = {"filename": filename, "subfolder": subfolder, "type": folder_type}
    url_values = urllib.parse.urlencode(data)
    with urllib.request.urlopen(f"http://{server}/view?{url_values}") as response:
        return response.read()


def get_history(prompt_id, server="127.0.0.1:8188"):  # type: ignore[no-untyped-def]
    url = f"http://{server}/history/{prompt_id}"
    with urllib.request.urlopen(url) as response:
        return json.loads(response.read())


def wait_for_result(prompt_id, server="127.0.0.1:8188", timeout=60):  # type: ignore[no-untyped-def]
    start = time.time()
    while time.time() - start < timeout:
        history = get_history(prompt_id, server)
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(1)
    return None


def download_images(prompt_id, server="127.0.0.1:8188"):  # type: ignore[no-untyped-def]
    history = get_history(prompt_id, server)
    images = []

    for node_id, node_output in history[prompt_id]['outputs'].items():  # noqa: B007 (as given)
        if 'images' in node_output:
            for img in node_output['images']:
                image_data = get_image(img['filename'], server)
                images.append(image_data)

    return images


WORKFLOW: dict[str, Any] = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "5": {"class_type": "KSampler", "inputs": {"seed": 123, "steps": 20, "cfg": 7, "sampler_name": "euler",
                                               "scheduler": "normal", "denoise": 1, "model": ["1", 0],
                                               "positive": ["2", 0], "negative": ["3", 0],
                                               "latent_image": ["4", 0]}},
    "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": "output", "images": ["6", 0]}},
}


def test_websocket_wait_history_and_images(demo_server: str) -> None:
    client_id = str(uuid.uuid4())
    ws = websocket.WebSocket()
    ws.connect(f"ws://{demo_server}/ws?clientId={client_id}", timeout=30)
    prompt_id = queue_prompt(WORKFLOW, demo_server, client_id)["prompt_id"]
    previews = 0
    while True:
        out = ws.recv()
        if isinstance(out, str):
            message = json.loads(out)
            if message["type"] == "executing":
                data = message["data"]
                if data["node"] is None and data["prompt_id"] == prompt_id:
                    break
        else:
            previews += 1
    ws.close()
    assert previews > 0
    history = get_history(prompt_id, demo_server)[prompt_id]
    images = []
    for node_id in history["outputs"]:
        for image in history["outputs"][node_id].get("images", []):
            images.append(get_image_full(image["filename"], image["subfolder"], image["type"], demo_server))
            assert get_image(image["filename"], demo_server) == images[-1]
    assert len(images) == 1 and images[0].startswith(b"\x89PNG")


def test_polling_without_websocket(demo_server: str) -> None:
    prompt_id = queue_prompt(WORKFLOW, demo_server)["prompt_id"]
    deadline = time.monotonic() + 30
    while prompt_id not in (history := get_history(prompt_id, demo_server)):
        assert time.monotonic() < deadline
        time.sleep(0.1)  # the documents' own polling loop (wait_for_result)
    image = history[prompt_id]["outputs"]["7"]["images"][0]
    assert get_image(image["filename"], demo_server).startswith(b"\x89PNG")


def test_quick_reference_wait_for_result_and_download_images(demo_server: str) -> None:
    prompt_id = queue_prompt(WORKFLOW, demo_server)["prompt_id"]
    result = wait_for_result(prompt_id, demo_server, timeout=30)
    assert result is not None and result["status"]["status_str"] == "success"
    images = download_images(prompt_id, demo_server)
    assert len(images) == 1 and images[0].startswith(b"\x89PNG")


def test_documentation_suite_integration_flow_with_requests(demo_server: str) -> None:
    client_id = str(uuid.uuid4())
    workflow = WORKFLOW
    base = f"http://{demo_server}"
    # 1. Submit workflow
    response = requests.post(f'{base}/prompt', json={
        'prompt': workflow,
        'client_id': client_id
    })
    prompt_id = response.json()['prompt_id']

    # 2. Monitor via WebSocket (or poll /history)
    assert wait_for_result(prompt_id, demo_server, timeout=30) is not None

    # 3. Get results
    history = requests.get(f'{base}/history/{prompt_id}')
    outputs = history.json()[prompt_id]['outputs']

    # 4. Download images
    downloaded = []
    for node_outputs in outputs.values():
        if 'images' in node_outputs:
            for img in node_outputs['images']:
                image_data = requests.get(f'{base}/view', params={
                    'filename': img['filename'],
                    'type': img['type']
                }).content
                downloaded.append(image_data)
    assert len(downloaded) == 1 and downloaded[0].startswith(b"\x89PNG")


queue_prompt_at, get_history_at = queue_prompt, get_history


def flask_middleware(server: str):  # type: ignore[no-untyped-def]
    """The quick reference's Flask app, as given; its helpers bound to the demo's address, and
    `create_workflow` (left to the reader there) returning the document's workflow."""
    from flask import Flask, jsonify, request

    def create_workflow(body):  # type: ignore[no-untyped-def]
        return WORKFLOW

    def queue_prompt(prompt):  # type: ignore[no-untyped-def]
        return queue_prompt_at(prompt, server)

    def get_history(prompt_id):  # type: ignore[no-untyped-def]
        return get_history_at(prompt_id, server)

    app = Flask(__name__)
    jobs = {}

    @app.route('/generate', methods=['POST'])
    def generate():  # type: ignore[no-untyped-def]
        # Create workflow from request
        workflow = create_workflow(request.json)

        # Submit to ComfyUI
        result = queue_prompt(workflow)
        job_id = str(uuid.uuid4())

        jobs[job_id] = {
            'prompt_id': result['prompt_id'],
            'status': 'processing'
        }

        return jsonify({'job_id': job_id})

    @app.route('/status/<job_id>')
    def status(job_id):  # type: ignore[no-untyped-def]
        if job_id not in jobs:
            return jsonify({'error': 'Not found'}), 404

        job = jobs[job_id]
        history = get_history(job['prompt_id'])

        if job['prompt_id'] in history:
            job['status'] = 'complete'
            job['outputs'] = history[job['prompt_id']]['outputs']

        return jsonify(job)

    return app


def test_quick_reference_flask_middleware(demo_server: str) -> None:
    app = flask_middleware(demo_server).test_client()
    job_id = app.post("/generate", json={"prompt": "a cat"}).get_json()["job_id"]
    deadline = time.monotonic() + 30
    while (job := app.get(f"/status/{job_id}").get_json())["status"] != "complete":
        assert job["status"] == "processing" and time.monotonic() < deadline
        time.sleep(0.1)  # the middleware is polled, as its clients would
    image = job["outputs"]["7"]["images"][0]
    assert get_image(image["filename"], demo_server).startswith(b"\x89PNG")
    assert app.get("/status/nope").status_code == 404
