"""What each simulated node does when it runs: its outputs, its time, its files.

Handlers take the run's context, then the node's inputs as keyword-only arguments, as the executor passes
them by name (so a missing input fails as a Python call would in ComfyUI), and return `(outputs, ui)`.
Samplers take `steps × step_ms / speed` and report every step through the context's `step` hook; loading
a checkpoint that is not on the GPU takes `model_load_ms / speed`; everything else about a millisecond.
Images become real PNG files only in SaveImage and PreviewImage.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from proxy.comfy import frames
from proxy.sim import images, jpeg
from proxy.sim.files import SimPaths, file_sha256, get_save_image_path, note_written
from proxy.sim.gpu import SimGpu
from proxy.sim.options import SimOptions
from proxy.sim.values import SimClip, SimConditioning, SimImage, SimLatent, SimMask, SimModel, SimVae

Outputs = tuple[tuple[Any, ...], dict[str, Any] | None]
StepHook = Callable[[int, int, bytes | None, int], None]


@dataclass(kw_only=True)
class RunContext:
    options: SimOptions
    paths: SimPaths
    gpu: SimGpu
    slow_factor: float
    node_id: str
    prompt_id: str
    state: dict[str, Any]  # the node object's own state, kept while the node stays in the prompt
    step: StepHook  # (value, total, preview image or None, preview format)

    async def pause(self, ms: float) -> None:
        await asyncio.sleep(ms * self.slow_factor / self.options.speed / 1000)

    async def node_work(self) -> None:
        if self.options.node_ms > 0:   # `--node-ms 0`: not even a yield, for the fastest backends
            await self.pause(self.options.node_ms)


async def _ensure_loaded(ctx: RunContext, ckpt_name: str) -> None:
    if ctx.gpu.needs_load(ckpt_name):
        await ctx.pause(ctx.options.model_load_ms)
        ctx.gpu.load(ckpt_name)


def _require(kind: str, name: str, known: tuple[str, ...]) -> None:
    if name not in known:  # folder_paths.get_full_path_or_raise
        raise FileNotFoundError(f"Model in folder '{kind}' with filename '{name}' not found.")


def _preview(ctx: RunContext, latent: SimLatent, recipe: str, step: int) -> bytes | None:
    if not ctx.options.previews:
        return None
    bx, by = max(1, min(64, -(-latent.width // 64))), max(1, min(64, -(-latent.height // 64)))
    rng = random.Random(images.seed_of(ctx.options.name, recipe, str(step)))
    colours = [(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(bx * by)]
    return jpeg.encode_block_jpeg(bx, by, colours, int(ctx.options.preview_kib * 1024))


async def _sample(ctx: RunContext, steps: int, latent: SimLatent, recipe: str) -> SimLatent:
    # Steps keep to a schedule from the first one, so timer overshoots do not add up over a sampling run
    # (a real GPU's steps do not get slower when the host's CPU is busy).
    loop = asyncio.get_running_loop()
    began = loop.time()
    for step in range(1, steps + 1):
        due = began + step * ctx.options.step_ms * ctx.slow_factor / ctx.options.speed / 1000
        await asyncio.sleep(max(due - loop.time(), 0))
        ctx.step(step, steps, _preview(ctx, latent, recipe, step), frames.FORMAT_JPEG)
    return SimLatent(latent.width, latent.height, latent.batch, recipe)


async def checkpoint_loader(ctx: RunContext, *, ckpt_name: str) -> Outputs:
    _require("checkpoints", ckpt_name, ctx.options.checkpoints)
    await _ensure_loaded(ctx, ckpt_name)
    return (SimModel(ckpt_name, f"model:{ckpt_name}"), SimClip(f"clip:{ckpt_name}"),
            SimVae(f"vae:{ckpt_name}")), None


async def lora_loader(ctx: RunContext, *, model: SimModel, clip: SimClip, lora_name: str, strength_model: float,
                      strength_clip: float) -> Outputs:
    await ctx.node_work()
    if strength_model == 0 and strength_clip == 0:
        return (model, clip), None
    _require("loras", lora_name, ctx.options.loras)
    tag = f"lora:{lora_name}:{strength_model}:{strength_clip}"
    return (SimModel(model.ckpt_name, f"{model.recipe}|{tag}"), SimClip(f"{clip.recipe}|{tag}")), None


async def vae_loader(ctx: RunContext, *, vae_name: str) -> Outputs:
    if vae_name != "pixel_space":
        _require("vae", vae_name, ctx.options.vaes)
    await ctx.node_work()
    return (SimVae(f"vae:{vae_name}"),), None


async def clip_text_encode(ctx: RunContext, *, text: str, clip: SimClip) -> Outputs:
    await ctx.node_work()
    return (SimConditioning(f"cond:{clip.recipe}:{text}"),), None


async def empty_latent_image(ctx: RunContext, *, width: int, height: int, batch_size: int = 1) -> Outputs:
    await ctx.node_work()
    return (SimLatent(width // 8 * 8, height // 8 * 8, batch_size, f"latent:{width}x{height}"),), None


async def ksampler(ctx: RunContext, *, model: SimModel, seed: int, steps: int, cfg: float, sampler_name: str,
                   scheduler: str, positive: SimConditioning, negative: SimConditioning,
                   latent_image: SimLatent, denoise: float = 1.0) -> Outputs:
    await _ensure_loaded(ctx, model.ckpt_name)
    recipe = (f"ksampler:{seed}:{steps}:{cfg}:{sampler_name}:{scheduler}:{denoise}:{model.recipe}:"
              f"{positive.recipe}:{negative.recipe}:{latent_image.recipe}")
    return (await _sample(ctx, steps, latent_image, recipe),), None


async def ksampler_advanced(ctx: RunContext, *, model: SimModel, add_noise: str, noise_seed: int, steps: int,
                            cfg: float, sampler_name: str, scheduler: str, positive: SimConditioning,
                            negative: SimConditioning, latent_image: SimLatent, start_at_step: int,
                            end_at_step: int, return_with_leftover_noise: str) -> Outputs:
    await _ensure_loaded(ctx, model.ckpt_name)
    recipe = (f"ksampler_advanced:{add_noise}:{noise_seed}:{steps}:{cfg}:{sampler_name}:{scheduler}:"
              f"{start_at_step}:{end_at_step}:{return_with_leftover_noise}:{model.recipe}:{positive.recipe}:"
              f"{negative.recipe}:{latent_image.recipe}")
    run_steps = max(0, min(end_at_step, steps) - start_at_step)
    return (await _sample(ctx, run_steps, latent_image, recipe),), None


async def vae_decode(ctx: RunContext, *, samples: SimLatent, vae: SimVae) -> Outputs:
    await ctx.node_work()
    return (SimImage(samples.width, samples.height, samples.batch, f"decode:{vae.recipe}:{samples.recipe}"),), None


async def vae_encode(ctx: RunContext, *, pixels: SimImage, vae: SimVae) -> Outputs:
    await ctx.node_work()
    recipe = f"encode:{vae.recipe}:{pixels.recipe}:{pixels.inverted}"
    return (SimLatent(pixels.width // 8 * 8, pixels.height // 8 * 8, pixels.batch, recipe),), None


INLINE_PIXELS = 128 * 128   # images up to this size are written on the event loop


def _write_png(path: str, image: SimImage, index: int, *, backend: str, text: dict[str, str], level: int) -> None:
    data = images.encode_png(image.width, image.height, images.render(image, backend, index), text, level)
    with open(path, "wb") as f:
        f.write(data)
    note_written(path)


def _png_text(prompt: Any, extra_pnginfo: Any) -> dict[str, str]:
    text = {}
    if prompt is not None:
        text["prompt"] = json.dumps(prompt)
    if isinstance(extra_pnginfo, dict):
        text.update({key: json.dumps(value) for key, value in extra_pnginfo.items()})
    return text


async def _save(ctx: RunContext, images_: SimImage, *, prefix: str, folder: str, kind: str, level: int,
                prompt: Any, extra_pnginfo: Any) -> Outputs:
    """nodes.py SaveImage.save_images: one `{prefix}_{counter:05}_.png` per image of the batch."""
    full_folder, filename, counter, subfolder = get_save_image_path(prefix, folder, images_.width,
                                                                    images_.height)
    results = []
    write = functools.partial(_write_png, backend=ctx.options.name, text=_png_text(prompt, extra_pnginfo),
                              level=level)
    for index in range(images_.batch):
        file = f"{filename.replace('%batch_num%', str(index))}_{counter:05}_.png"
        path = os.path.join(full_folder, file)
        if images_.width * images_.height <= INLINE_PIXELS:
            write(path, images_, index)   # a thread hand-off costs more than encoding a thumbnail
        else:
            await asyncio.to_thread(write, path, images_, index)
        results.append({"filename": file, "subfolder": subfolder, "type": kind})
        counter += 1
    return (), {"images": results}


async def save_image(ctx: RunContext, *, images: SimImage, filename_prefix: str = "ComfyUI", prompt: Any = None,
                     extra_pnginfo: Any = None) -> Outputs:
    return await _save(ctx, images, prefix=filename_prefix, folder=ctx.paths.output, kind="output", level=4,
                       prompt=prompt, extra_pnginfo=extra_pnginfo)


async def preview_image(ctx: RunContext, *, images: SimImage, prompt: Any = None, extra_pnginfo: Any = None
                        ) -> Outputs:
    # PreviewImage's random prefix is picked once per node object, as in ComfyUI.
    suffix = ctx.state.setdefault("prefix_append",
                                  "_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5)))
    return await _save(ctx, images, prefix="ComfyUI" + suffix, folder=ctx.paths.temp, kind="temp", level=1,
                       prompt=prompt, extra_pnginfo=extra_pnginfo)


def _read_input(ctx: RunContext, image: str) -> tuple[int, int, str]:
    path = ctx.paths.annotated_input_path(image)
    with open(path, "rb") as f:
        head = f.read(32)
    width, height = images.png_size(head) or (512, 512)
    return width, height, file_sha256(path)


async def load_image(ctx: RunContext, *, image: str) -> Outputs:
    width, height, digest = await asyncio.to_thread(_read_input, ctx, image)
    return (SimImage(width, height, 1, f"load:{digest}"), SimMask(64, 64, f"mask:{digest}")), None


async def load_image_mask(ctx: RunContext, *, image: str, channel: str) -> Outputs:
    width, height, digest = await asyncio.to_thread(_read_input, ctx, image)
    return (SimMask(width, height, f"mask:{digest}:{channel}"),), None


async def image_scale(ctx: RunContext, *, image: SimImage, upscale_method: str, width: int, height: int,
                      crop: str) -> Outputs:
    await ctx.node_work()
    if width == 0 and height == 0:
        return (image,), None
    if width == 0:
        width = max(1, round(image.width * height / image.height))
    elif height == 0:
        height = max(1, round(image.height * width / image.width))
    return (image.derive(f"scale:{upscale_method}:{crop}:{width}x{height}", width=width, height=height),), None


async def image_invert(ctx: RunContext, *, image: SimImage) -> Outputs:
    await ctx.node_work()
    return (image.derive("invert", inverted=not image.inverted),), None


async def empty_image(ctx: RunContext, *, width: int, height: int, batch_size: int = 1, color: int = 0) -> Outputs:
    await ctx.node_work()
    return (SimImage(width, height, batch_size, f"empty:{width}x{height}:{color}"),), None


async def image_blur(ctx: RunContext, *, image: SimImage, blur_radius: int, sigma: float) -> Outputs:
    await ctx.node_work()
    if blur_radius == 0:
        return (image,), None
    return (image.derive(f"blur:{blur_radius}:{sigma}"),), None


Handler = Callable[..., Awaitable[Outputs]]

HANDLERS: dict[str, Handler] = {
    "CheckpointLoaderSimple": checkpoint_loader, "LoraLoader": lora_loader, "VAELoader": vae_loader,
    "CLIPTextEncode": clip_text_encode, "EmptyLatentImage": empty_latent_image, "KSampler": ksampler,
    "KSamplerAdvanced": ksampler_advanced, "VAEDecode": vae_decode, "VAEEncode": vae_encode,
    "SaveImage": save_image, "PreviewImage": preview_image, "LoadImage": load_image,
    "LoadImageMask": load_image_mask, "ImageScale": image_scale, "ImageInvert": image_invert,
    "EmptyImage": empty_image, "ImageBlur": image_blur,
}

# ComfyUI IS_CHANGED: the loaders of input files change with the file's content.
IS_CHANGED_FILE_INPUT = {"LoadImage", "LoadImageMask"}
