"""The simulator's one settings object, built once from flags (or by code) and handed down."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

DEFAULT_CHECKPOINTS = ("sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors")
DEFAULT_LORAS = ("add_detail.safetensors", "lcm_lora_sdxl.safetensors")
DEFAULT_VAES = ("sdxl_vae.safetensors", "vae-ft-mse-840000-ema-pruned.safetensors")


@dataclass(frozen=True)
class SimOptions:
    name: str = "sim"
    host: str = "127.0.0.1"
    port: int = 8189
    vram_gb: float = 24.0
    step_ms: float = 50.0
    node_ms: float = 1.0  # time of every other node (loaders, encoders, decoders, image ops)
    speed: float = 1.0
    checkpoints: tuple[str, ...] = DEFAULT_CHECKPOINTS
    loras: tuple[str, ...] = DEFAULT_LORAS
    vaes: tuple[str, ...] = DEFAULT_VAES
    without_nodes: tuple[str, ...] = ()
    model_load_ms: float = 500.0  # time to load a checkpoint that is not loaded
    previews: bool = True  # send binary preview frames while sampling
    preview_kib: float = 0.0  # pad each preview JPEG to about this size (0: as small as it encodes)
    base_dir: str | None = None  # input/ output/ temp/ user/; None = a fresh temp dir removed on close
    max_upload_mb: int = 100

    def __post_init__(self) -> None:
        if self.speed <= 0:
            raise ValueError("speed must be positive")
        if self.step_ms < 0 or self.model_load_ms < 0 or self.node_ms < 0:
            raise ValueError("step_ms, node_ms and model_load_ms must not be negative")


def _names(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `comfy-proxy sim`; `options_from_args` turns them into `SimOptions`."""
    d = SimOptions()
    parser.add_argument("--name", default=d.name, help="backend name (in /system_stats and image pixels)")
    parser.add_argument("--host", default=d.host)
    parser.add_argument("--port", type=int, default=d.port, help="0 picks a free port")
    parser.add_argument("--vram-gb", type=float, default=d.vram_gb)
    parser.add_argument("--step-ms", type=float, default=d.step_ms, help="time of one sampler step")
    parser.add_argument("--node-ms", type=float, default=d.node_ms,
                        help="time of every node that is not a sampler step or a model load")
    parser.add_argument("--speed", type=float, default=d.speed, help="divides every simulated duration")
    parser.add_argument("--checkpoints", type=_names, default=d.checkpoints, help="comma-separated names")
    parser.add_argument("--loras", type=_names, default=d.loras, help="comma-separated names")
    parser.add_argument("--vaes", type=_names, default=d.vaes, help="comma-separated names")
    parser.add_argument("--without-nodes", type=_names, default=d.without_nodes,
                        help="comma-separated node classes to leave out of object_info")
    parser.add_argument("--model-load-ms", type=float, default=d.model_load_ms)
    parser.add_argument("--no-previews", action="store_true", help="send no binary preview frames")
    parser.add_argument("--preview-kib", type=float, default=d.preview_kib,
                        help="pad each preview JPEG to about this size (a real TAESD preview is tens of KiB)")
    parser.add_argument("--base-dir", default=None, help="input/ output/ temp/ user/ live here")
    parser.add_argument("--max-upload-mb", type=int, default=d.max_upload_mb)
    parser.add_argument("--count", type=int, default=1,
                        help="this many simulators in one process, on ports PORT..PORT+COUNT-1, named NAME-0...")


def options_from_args(args: argparse.Namespace) -> SimOptions:
    return SimOptions(
        name=args.name, host=args.host, port=args.port, vram_gb=args.vram_gb, step_ms=args.step_ms,
        node_ms=getattr(args, "node_ms", SimOptions.node_ms),
        speed=args.speed, checkpoints=tuple(args.checkpoints), loras=tuple(args.loras),
        vaes=tuple(getattr(args, "vaes", SimOptions.vaes)), without_nodes=tuple(args.without_nodes),
        model_load_ms=args.model_load_ms, previews=not args.no_previews,
        preview_kib=getattr(args, "preview_kib", SimOptions.preview_kib), base_dir=args.base_dir,
        max_upload_mb=getattr(args, "max_upload_mb", SimOptions.max_upload_mb),
    )
