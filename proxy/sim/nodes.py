"""The simulator's `/object_info`: the common nodes, shaped exactly as ComfyUI 0.3.75 serves them.

Shapes were taken from a real 0.3.75 `GET /object_info` (traces/info_routes.json holds three of them).
Model combo lists come from the options and LoadImage's list from the input folder, as in ComfyUI.
"""

from __future__ import annotations

import os
from typing import Any

from proxy.sim.options import SimOptions

SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
]
SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
              "linear_quadratic", "kl_optimal"]
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
IMAGE_EXTENSIONS = {"png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff", "apng", "jfif", "avif"}
MAX_RESOLUTION = 16384
MAX_SEED = 0xFFFFFFFFFFFFFFFF
HIDDEN_PROMPT = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
SAVE_DESCRIPTION = "Saves the input images to your ComfyUI output directory."

_TIP = {
    "ckpt": "The name of the checkpoint (model) to load.",
    "prefix": "The prefix for the file to save. This may include formatting information such as "
              "%date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes.",
    "cfg": "The Classifier-Free Guidance scale balances creativity and adherence to the prompt. Higher values "
           "result in images more closely matching the prompt however too high values will negatively impact "
           "quality.",
    "denoise": "The amount of denoising applied, lower values will maintain the structure of the initial image "
               "allowing for image to image sampling.",
}


def _num(kind: str, default: Any, lo: Any, hi: Any, step: Any = None, **extra: Any) -> list[Any]:
    options: dict[str, Any] = {"default": default, "min": lo, "max": hi}
    if step is not None:
        options["step"] = step
    options.update(extra)
    return [kind, options]


def _typed(kind: str, tooltip: str | None = None) -> list[Any]:
    return [kind, {"tooltip": tooltip}] if tooltip else [kind]


def _node(name: str, display: str, category: str, required: dict[str, list[Any]], output: list[str], *,
          description: str = "", output_node: bool = False, hidden: dict[str, str] | None = None,
          tooltips: list[str] | None = None) -> dict[str, Any]:
    """A V1 node's info in the key order of ComfyUI's server.py `node_info`."""
    inputs: dict[str, Any] = {"required": required}
    if hidden:
        inputs["hidden"] = dict(hidden)
    info: dict[str, Any] = {
        "input": inputs,
        "input_order": {key: list(value) for key, value in inputs.items()},
        "output": list(output),
        "output_is_list": [False] * len(output),
        "output_name": list(output),
        "name": name,
        "display_name": display,
        "description": description,
        "python_module": "nodes",
        "category": category,
        "output_node": output_node,
    }
    if tooltips:
        info["output_tooltips"] = list(tooltips)
    return info


def _loaders(options: SimOptions) -> list[dict[str, Any]]:
    return [
        _node("CheckpointLoaderSimple", "Load Checkpoint", "loaders",
              {"ckpt_name": [list(options.checkpoints), {"tooltip": _TIP["ckpt"]}]}, ["MODEL", "CLIP", "VAE"],
              description="Loads a diffusion model checkpoint, diffusion models are used to denoise latents.",
              tooltips=["The model used for denoising latents.",
                        "The CLIP model used for encoding text prompts.",
                        "The VAE model used for encoding and decoding images to and from latent space."]),
        _node("LoraLoader", "Load LoRA", "loaders", {
            "model": _typed("MODEL", "The diffusion model the LoRA will be applied to."),
            "clip": _typed("CLIP", "The CLIP model the LoRA will be applied to."),
            "lora_name": [list(options.loras), {"tooltip": "The name of the LoRA."}],
            "strength_model": _num("FLOAT", 1.0, -100.0, 100.0, 0.01, tooltip="How strongly to modify the "
                                   "diffusion model. This value can be negative."),
            "strength_clip": _num("FLOAT", 1.0, -100.0, 100.0, 0.01, tooltip="How strongly to modify the "
                                  "CLIP model. This value can be negative."),
        }, ["MODEL", "CLIP"], description="LoRAs are used to modify diffusion and CLIP models, altering the way "
           "in which latents are denoised such as applying styles. Multiple LoRA nodes can be linked together.",
            tooltips=["The modified diffusion model.", "The modified CLIP model."]),
        _node("VAELoader", "Load VAE", "loaders", {"vae_name": [[*options.vaes, "pixel_space"]]}, ["VAE"]),
    ]


def _sampler_inputs() -> dict[str, list[Any]]:
    return {
        "model": _typed("MODEL", "The model used for denoising the input latent."),
        "seed": _num("INT", 0, 0, MAX_SEED, control_after_generate=True,
                     tooltip="The random seed used for creating the noise."),
        "steps": _num("INT", 20, 1, 10000, tooltip="The number of steps used in the denoising process."),
        "cfg": _num("FLOAT", 8.0, 0.0, 100.0, 0.1, round=0.01, tooltip=_TIP["cfg"]),
        "sampler_name": [list(SAMPLERS), {"tooltip": "The algorithm used when sampling, this can affect the "
                                          "quality, speed, and style of the generated output."}],
        "scheduler": [list(SCHEDULERS), {"tooltip": "The scheduler controls how noise is gradually removed "
                                         "to form the image."}],
        "positive": _typed("CONDITIONING", "The conditioning describing the attributes you want to include "
                           "in the image."),
        "negative": _typed("CONDITIONING", "The conditioning describing the attributes you want to exclude "
                           "from the image."),
        "latent_image": _typed("LATENT", "The latent image to denoise."),
        "denoise": _num("FLOAT", 1.0, 0.0, 1.0, 0.01, tooltip=_TIP["denoise"]),
    }


def _advanced_sampler_inputs() -> dict[str, list[Any]]:
    return {
        "model": ["MODEL"], "add_noise": [["enable", "disable"]],
        "noise_seed": _num("INT", 0, 0, MAX_SEED, control_after_generate=True),
        "steps": _num("INT", 20, 1, 10000), "cfg": _num("FLOAT", 8.0, 0.0, 100.0, 0.1, round=0.01),
        "sampler_name": [list(SAMPLERS)], "scheduler": [list(SCHEDULERS)],
        "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
        "start_at_step": _num("INT", 0, 0, 10000), "end_at_step": _num("INT", 10000, 0, 10000),
        "return_with_leftover_noise": [["disable", "enable"]],
    }


def _generation() -> list[dict[str, Any]]:
    size_tip = "The {} of the latent images in pixels."
    return [
        _node("CLIPTextEncode", "CLIP Text Encode (Prompt)", "conditioning", {
            "text": ["STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The text to be encoded."}],
            "clip": _typed("CLIP", "The CLIP model used for encoding the text."),
        }, ["CONDITIONING"], description="Encodes a text prompt using a CLIP model into an embedding that can be "
           "used to guide the diffusion model towards generating specific images.",
            tooltips=["A conditioning containing the embedded text used to guide the diffusion model."]),
        _node("EmptyLatentImage", "Empty Latent Image", "latent", {
            "width": _num("INT", 512, 16, MAX_RESOLUTION, 8, tooltip=size_tip.format("width")),
            "height": _num("INT", 512, 16, MAX_RESOLUTION, 8, tooltip=size_tip.format("height")),
            "batch_size": _num("INT", 1, 1, 4096, tooltip="The number of latent images in the batch."),
        }, ["LATENT"], description="Create a new batch of empty latent images to be denoised via sampling.",
            tooltips=["The empty latent image batch."]),
        _node("KSampler", "KSampler", "sampling", _sampler_inputs(), ["LATENT"],
              description="Uses the provided model, positive and negative conditioning to denoise the latent "
                          "image.", tooltips=["The denoised latent."]),
        _node("KSamplerAdvanced", "KSampler (Advanced)", "sampling", _advanced_sampler_inputs(), ["LATENT"]),
        _node("VAEDecode", "VAE Decode", "latent", {
            "samples": _typed("LATENT", "The latent to be decoded."),
            "vae": _typed("VAE", "The VAE model used for decoding the latent."),
        }, ["IMAGE"], description="Decodes latent images back into pixel space images.",
            tooltips=["The decoded image."]),
        _node("VAEEncode", "VAE Encode", "latent", {"pixels": ["IMAGE"], "vae": ["VAE"]}, ["LATENT"]),
    ]


def _image_nodes(input_files: list[str]) -> list[dict[str, Any]]:
    return [
        _node("SaveImage", "Save Image", "image", {
            "images": _typed("IMAGE", "The images to save."),
            "filename_prefix": ["STRING", {"default": "ComfyUI", "tooltip": _TIP["prefix"]}],
        }, [], description=SAVE_DESCRIPTION, output_node=True, hidden=HIDDEN_PROMPT),
        _node("PreviewImage", "Preview Image", "image", {"images": ["IMAGE"]}, [], description=SAVE_DESCRIPTION,
              output_node=True, hidden=HIDDEN_PROMPT),
        _node("LoadImage", "Load Image", "image", {"image": [list(input_files), {"image_upload": True}]},
              ["IMAGE", "MASK"]),
        _node("LoadImageMask", "Load Image (as Mask)", "mask", {
            "image": [list(input_files), {"image_upload": True}],
            "channel": [["alpha", "red", "green", "blue"]],
        }, ["MASK"]),
        _node("ImageScale", "Upscale Image", "image/upscaling", {
            "image": ["IMAGE"], "upscale_method": [list(UPSCALE_METHODS)],
            "width": _num("INT", 512, 0, MAX_RESOLUTION, 1), "height": _num("INT", 512, 0, MAX_RESOLUTION, 1),
            "crop": [["disabled", "center"]],
        }, ["IMAGE"]),
        _node("ImageInvert", "Invert Image", "image", {"image": ["IMAGE"]}, ["IMAGE"]),
        _node("EmptyImage", "EmptyImage", "image", {
            "width": _num("INT", 512, 1, MAX_RESOLUTION, 1), "height": _num("INT", 512, 1, MAX_RESOLUTION, 1),
            "batch_size": _num("INT", 1, 1, 4096), "color": _num("INT", 0, 0, 0xFFFFFF, 1, display="color"),
        }, ["IMAGE"]),
        _image_blur(),
    ]


def _image_blur() -> dict[str, Any]:
    """A V3 node (comfy_extras): its info has the V3 key order and flags."""
    required = {"image": ["IMAGE", {}], "blur_radius": _num("INT", 1, 1, 31, 1),
                "sigma": _num("FLOAT", 1.0, 0.1, 10.0, 0.1)}
    return {
        "input": {"required": required}, "input_order": {"required": list(required)},
        "output": ["IMAGE"], "output_is_list": [False], "output_name": ["IMAGE"], "output_tooltips": [None],
        "name": "ImageBlur", "display_name": None, "description": "",
        "python_module": "comfy_extras.nodes_post_processing", "category": "image/postprocessing",
        "output_node": False, "deprecated": False, "experimental": False, "api_node": False,
    }


def list_input_images(input_dir: str) -> list[str]:
    """LoadImage's combo: image files directly in input/, sorted (nodes.py LoadImage.INPUT_TYPES)."""
    try:
        names = [f for f in os.listdir(input_dir) if os.path.isfile(os.path.join(input_dir, f))]
    except FileNotFoundError:
        return []
    return sorted(f for f in names if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)


def object_info(options: SimOptions, input_dir: str) -> dict[str, dict[str, Any]]:
    """`GET /object_info` of this simulator, computed on each call like ComfyUI's."""
    infos = _loaders(options) + _generation() + _image_nodes(list_input_images(input_dir))
    return {info["name"]: info for info in infos if info["name"] not in options.without_nodes}
