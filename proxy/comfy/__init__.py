"""ComfyUI protocol knowledge shared by the simulator and the proxy.

`validation` is ComfyUI 0.3.75's prompt validation over `/object_info` dicts; `frames` encodes and
decodes the binary websocket frames (comfyui-protocol.md §8); `uigraph` turns the graph the ComfyUI
editor saves into the prompt its `graphToPrompt` makes.
"""
