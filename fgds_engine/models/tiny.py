"""Tiny random models and pipelines for tests and the CPU bench (no weights, no network).

``tiny_models`` / ``small_models``: a UNet, VAE, classifier and DDIM scheduler bundle. ``tiny_pipeline``: a
tiny random diffusers pipeline of each family the engine runs (SD 1.x, SD 2.x v-prediction, Stable unCLIP,
SDXL), with a byte-level CLIP tokenizer written to a temporary folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .contracts import freeze


@dataclass
class Models:
    """A bundle of models the sampler needs."""

    unet: nn.Module
    vae: nn.Module | None
    classifier: nn.Module
    scheduler: Any
    text_dim: int
    upcast_vae: bool = False  # SDXL: the VAE decodes in float32 under float16 (``contracts.vae_dtype``)


def _random_models(*, num_classes: int, seed: int, unet_channels: tuple[int, ...], attn_levels: int,
                   text_dim: int, head_dim: int, groups: int, vae_channels: tuple[int, ...] | None,
                   latent_side: int, pixel_channels: int, classifier, image_embed_dim: int | None) -> Models:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    levels = len(unet_channels)
    down = ("CrossAttnDownBlock2D",) * attn_levels + ("DownBlock2D",) * (levels - attn_levels)
    extra = {}
    if image_embed_dim:
        extra = dict(class_embed_type="projection", projection_class_embeddings_input_dim=image_embed_dim)
    channels = 4 if vae_channels else pixel_channels
    unet = UNet2DConditionModel(
        sample_size=latent_side, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=unet_channels, down_block_types=down,
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)), cross_attention_dim=text_dim,
        attention_head_dim=head_dim, norm_num_groups=groups, **extra)
    vae = None if vae_channels is None else AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), norm_num_groups=groups,
        sample_size=latent_side * 2 ** (len(vae_channels) - 1))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    models = Models(unet, vae, classifier(), scheduler, text_dim=text_dim)
    freeze(models.unet, models.vae, models.classifier)
    return models


def tiny_models(*, num_classes: int = 10, seed: int = 0, image_embed_dim: int | None = None,
                pixel_space: bool = False) -> Models:
    """Tiny random UNet2DConditionModel (8x8x4 latents), AutoencoderKL (16x16 images), timm test_vit.

    ``image_embed_dim`` adds an unCLIP-style projection class embedding fed by ``class_labels``;
    ``pixel_space`` drops the VAE (the UNet then works on 16x16x3 images). Weights are random.
    """
    import timm

    # a smooth classifier (GELU, softmax, LayerNorm): a ReLU / max-pool one makes the feedback gradient
    # piecewise, and rounding-level differences can then cross a kink (seen: a 5.8% jump at one step)
    classifier = lambda: timm.create_model("test_vit", pretrained=False, num_classes=num_classes,  # noqa: E731
                                           img_size=16, patch_size=4, dynamic_img_size=False)
    return _random_models(num_classes=num_classes, seed=seed, unet_channels=(16, 32), attn_levels=1,
                          text_dim=16, head_dim=4, groups=8, vae_channels=None if pixel_space else (16, 32),
                          latent_side=16 if pixel_space else 8, pixel_channels=3, classifier=classifier,
                          image_embed_dim=image_embed_dim)


def small_models(*, num_classes: int = 10, seed: int = 0) -> Models:
    """Benchmark size: 12.8 M-parameter UNet on 16x16x4 latents, 3-level VAE (64x64 images), ResNet-18."""
    import timm

    classifier = lambda: timm.create_model("resnet18", pretrained=False, num_classes=num_classes)  # noqa: E731
    return _random_models(num_classes=num_classes, seed=seed, unet_channels=(64, 128, 256), attn_levels=2,
                          text_dim=256, head_dim=8, groups=32, vae_channels=(32, 64, 128), latent_side=16,
                          pixel_channels=3, classifier=classifier, image_embed_dim=None)


# ---------------------------------------------------------------- tiny random diffusers pipelines

TINY_TEXT_DIM, TINY_PROJ_DIM = 16, 6  # tiny text width = UNet cross-attention dim; image embedding width

def tiny_tokenizer(folder: str | Path):
    """A CLIPTokenizer over the 2 x 256 byte symbols of GPT-2's byte alphabet (no merges) and two specials,
    written to ``folder`` (no download)."""
    from transformers import CLIPTokenizer

    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _tiny_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TINY_TEXT_DIM, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                         pad_token_id=vocab_size - 1)
    return CLIPTextModel(cfg).eval()


TINY_KINDS = ("sd", "sd2", "unclip", "sdxl")
TINY_TIME_DIM = 4  # SDXL: the width of each of the six time-id embeddings


def tiny_pipeline(kind: str = "sd", *, seed: int = 0):
    """A tiny random diffusers pipeline (8x8x4 latents, 16x16 images), no weights, no network.

    kind "sd": StableDiffusionPipeline (text, DDIM). "sd2": the same family as SD 2.x ships it: a UNet with
    linear attention projections and a v-prediction DDIM scheduler. "unclip": StableUnCLIPImg2ImgPipeline
    whose UNet takes the noise-augmented CLIP image embedding (TINY_PROJ_DIM) plus its noise-level embedding
    as ``class_labels``. "sdxl": StableDiffusionXLPipeline (two text encoders, the second with a projection;
    the UNet's text_time embedding of the pooled text and six size / crop ids; a VAE with SDXL's
    scaling_factor 0.13025 and force_upcast; Euler, as SDXL ships).
    """
    import tempfile

    from diffusers import DDIMScheduler

    if kind not in TINY_KINDS:
        raise ValueError(f"tiny pipeline kind must be one of {', '.join(TINY_KINDS)}, got {kind!r}")
    if kind == "sdxl":
        return _tiny_sdxl(seed)
    m = tiny_models(seed=seed, image_embed_dim=2 * TINY_PROJ_DIM if kind == "unclip" else None)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer(tmp)
    scheduler = DDIMScheduler.from_config(m.scheduler.config)
    unet = m.unet
    if kind == "sd2":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_config({**m.unet.config, "use_linear_projection": True})
        freeze(unet)
        scheduler = DDIMScheduler.from_config(m.scheduler.config, prediction_type="v_prediction")
    common = dict(vae=m.vae, text_encoder=_tiny_text_encoder(len(tok)), tokenizer=tok, unet=unet,
                  scheduler=scheduler)
    if kind in ("sd", "sd2"):
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        from diffusers import DDPMScheduler, StableUnCLIPImg2ImgPipeline
        from diffusers.pipelines.stable_diffusion import StableUnCLIPImageNormalizer
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=16, projection_dim=TINY_PROJ_DIM, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, image_size=16, patch_size=4, num_channels=3)).eval()
        pipe = StableUnCLIPImg2ImgPipeline(
            **common, feature_extractor=CLIPImageProcessor(crop_size=16, size=16), image_encoder=vision,
            image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=TINY_PROJ_DIM),
            image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_sdxl(seed: int):
    import tempfile

    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer(Path(tmp) / "1")
        tok_2 = tiny_tokenizer(Path(tmp) / "2")
    enc = _tiny_text_encoder(len(tok))
    n = len(tok_2)
    enc_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=n, hidden_size=TINY_TEXT_DIM, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1,
        pad_token_id=n - 1, projection_dim=TINY_TEXT_DIM)).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
        cross_attention_dim=2 * TINY_TEXT_DIM, addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_DIM,
        projection_class_embeddings_input_dim=6 * TINY_TIME_DIM + TINY_TEXT_DIM)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16, scaling_factor=0.13025, force_upcast=True)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading")
    freeze(unet, vae, enc, enc_2)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=enc, text_encoder_2=enc_2, tokenizer=tok,
                                     tokenizer_2=tok_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_classifier(num_classes: int, *, seed: int = 0) -> nn.Module:
    """The tiny smooth ViT of ``tiny_models`` for 16x16 images, with random weights."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False, num_classes=num_classes, img_size=16,
                              patch_size=4, dynamic_img_size=False)
    freeze(model)
    return model
