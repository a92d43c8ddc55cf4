"""Published model configurations with random weights, for the GPU bench: SD 1.5 and SDXL at their real
sizes (no weights can be downloaded here; speed and memory do not depend on the weights' values)."""

from __future__ import annotations

import torch

from .contracts import freeze
from .tiny import Models, tiny_pipeline


def sd15_unet_config(sample_size: int) -> dict:
    """Stable Diffusion 1.5's UNet (859.5 M parameters); sample_size = image size / 8."""
    return dict(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)


def sd15_vae_config(image_size: int) -> dict:
    """Stable Diffusion 1.5's AutoencoderKL (83.7 M parameters)."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=image_size,
                scaling_factor=0.18215)


def sd15_models(image_size: int, *, num_classes: int = 1000, seed: int = 0, device="cpu") -> Models:
    """SD 1.5 UNet + VAE and a timm ResNeXt-50 (32x4d), random weights, built on ``device``."""
    import timm
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**sd15_unet_config(image_size // 8))
        vae = AutoencoderKL(**sd15_vae_config(image_size))
        clf = timm.create_model("resnext50_32x4d", pretrained=False, num_classes=num_classes)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    freeze(unet, vae, clf)  # inference models, as loaded ones are: the reference loop runs them as they are
    return Models(unet, vae, clf, sched, text_dim=768)


def sdxl_unet_config(sample_size: int) -> dict:
    """SDXL 1.0 base's UNet (2.57 B parameters): text_time conditioning on the pooled OpenCLIP-bigG text
    embedding (1280) and six size / crop ids; sample_size = image size / 8."""
    return dict(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32)


def sdxl_vae_config(image_size: int) -> dict:
    """SDXL's AutoencoderKL (83.7 M parameters): SD's architecture, scaling_factor 0.13025, force_upcast."""
    return {**sd15_vae_config(image_size), "scaling_factor": 0.13025, "force_upcast": True}


def _euler_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  steps_offset=1, timestep_spacing="leading")


def sdxl_models(image_size: int = 1024, *, num_classes: int = 1000, seed: int = 0, device="cpu") -> Models:
    """SDXL UNet + VAE and a timm ResNeXt-50 (32x4d), random weights, built on ``device``; Euler, as SDXL
    ships."""
    import timm
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**sdxl_unet_config(image_size // 8))
        vae = AutoencoderKL(**sdxl_vae_config(image_size))
        clf = timm.create_model("resnext50_32x4d", pretrained=False, num_classes=num_classes)
    freeze(unet, vae, clf)
    return Models(unet, vae, clf, _euler_scheduler(), text_dim=2048, upcast_vae=True)


def tiny_sdxl_models(*, num_classes: int = 10, seed: int = 0) -> Models:
    """The tiny SDXL pipeline's UNet, VAE and scheduler with the tiny classifier: the sdxl preset's CPU dry
    run."""
    from .tiny import tiny_classifier

    pipe = tiny_pipeline("sdxl", seed=seed)
    return Models(pipe.unet, pipe.vae, tiny_classifier(num_classes, seed=seed), pipe.scheduler,
                  text_dim=pipe.unet.config.cross_attention_dim, upcast_vae=True)
