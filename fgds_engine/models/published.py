"""Published model configurations with random weights, for the GPU bench: SD 1.5, SDXL, SD3 Medium,
FLUX.1-dev and PixArt-Sigma at their real sizes (no weights can be downloaded here; speed and memory do not
depend on the weights' values)."""

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


# ---------------------------------------------------------------- the transformer families (random weights)

def flow_vae_config(image_size: int, *, scaling: float, shift: float) -> dict:
    """SD3's / Flux's 16-channel VAE (83.8 M parameters): SD's layout without the quant convs, with its own
    scaling and shift factors."""
    return {**sd15_vae_config(image_size), "latent_channels": 16, "scaling_factor": scaling,
            "shift_factor": shift, "use_quant_conv": False, "use_post_quant_conv": False}


def sd3_medium_transformer_config(sample_size: int = 128) -> dict:
    """SD3 Medium's MMDiT (2,028 M parameters); sample_size = image size / 8."""
    return dict(sample_size=sample_size, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)


def flux_dev_transformer_config() -> dict:
    """FLUX.1-dev's transformer (11,901 M parameters; guidance-distilled: the guidance embedding)."""
    return dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def pixart_sigma_transformer_config(sample_size: int = 128) -> dict:
    """PixArt-Sigma's DiT-XL/2 at 1024 px (610.9 M parameters; learned sigma: 8 output channels)."""
    return dict(sample_size=sample_size, num_layers=28, attention_head_dim=72, num_attention_heads=16,
                in_channels=4, out_channels=8, cross_attention_dim=1152, caption_channels=4096,
                interpolation_scale=max(sample_size // 64, 1), use_additional_conditions=False,
                norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                attention_bias=True,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, patch_size=2)


def _resnext(num_classes: int):
    import timm

    return timm.create_model("resnext50_32x4d", pretrained=False, num_classes=num_classes)


def sd3_models(image_size: int = 1024, *, num_classes: int = 1000, seed: int = 0, device="cpu") -> Models:
    """SD3 Medium's transformer and VAE, a ResNeXt-50, random weights; FlowMatchEuler with shift 3.0."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**sd3_medium_transformer_config(image_size // 8))
        vae = AutoencoderKL(**flow_vae_config(image_size, scaling=1.5305, shift=0.0609))
        clf = _resnext(num_classes)
    freeze(transformer, vae, clf)
    return Models(transformer, vae, clf, FlowMatchEulerDiscreteScheduler(shift=3.0), text_dim=4096)


def flux_scheduler():
    """FLUX.1's FlowMatchEuler: dynamic shifting from the image's sequence length."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                           max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def flux_models(image_size: int = 1024, *, num_classes: int = 1000, seed: int = 0, device="cpu") -> Models:
    """FLUX.1-dev's transformer and VAE, a ResNeXt-50, random weights (``image_size`` only sizes the VAE's
    config: the transformer takes any size)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**flux_dev_transformer_config())
        vae = AutoencoderKL(**flow_vae_config(image_size, scaling=0.3611, shift=0.1159))
        clf = _resnext(num_classes)
    freeze(transformer, vae, clf)
    return Models(transformer, vae, clf, flux_scheduler(), text_dim=4096)


def pixart_sigma_models(image_size: int = 1024, *, num_classes: int = 1000, seed: int = 0,
                        device="cpu") -> Models:
    """PixArt-Sigma's DiT and SDXL's VAE, a ResNeXt-50, random weights; DPM-Solver++ (its pipeline's)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        transformer = PixArtTransformer2DModel(**pixart_sigma_transformer_config(image_size // 8))
        vae = AutoencoderKL(**{**sd15_vae_config(image_size), "scaling_factor": 0.13025})
        clf = _resnext(num_classes)
    freeze(transformer, vae, clf)
    return Models(transformer, vae, clf, DPMSolverMultistepScheduler(), text_dim=4096)


def tiny_flux_models(*, num_classes: int = 10, seed: int = 0) -> Models:
    """The tiny FLUX.1-dev-style pipeline's transformer, VAE and scheduler with the tiny classifier: the flux
    presets' CPU dry run."""
    from .tiny import tiny_classifier
    from .tiny_transformers import tiny_flow_pipeline

    pipe = tiny_flow_pipeline("flux-dev", seed=seed)
    return Models(pipe.transformer, pipe.vae, tiny_classifier(num_classes, seed=seed), pipe.scheduler,
                  text_dim=pipe.transformer.config.joint_attention_dim)
