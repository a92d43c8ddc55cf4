"""Tiny random diffusers pipelines built in code (no weights, no network): StableDiffusionPipeline and
StableUnCLIPImg2ImgPipeline around the tiny UNet / VAE of ``fgds_engine.models``, with transformers' CLIP
text / vision models and a byte-level CLIP tokenizer written to a temporary folder."""

import json
from pathlib import Path

import torch

from fgds_engine.models import tiny_models

TEXT_DIM, PROJ_DIM = 16, 6  # text hidden size = UNet cross-attention dim; image embedding = 2 * PROJ_DIM


def tiny_tokenizer(folder: Path):
    """A CLIPTokenizer whose vocabulary is the 2 x 256 byte symbols (no merges) and the two specials."""
    from transformers import CLIPTokenizer

    # GPT-2's byte-level alphabet: printable bytes map to themselves, the others to code points from 256 up
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def _text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                         pad_token_id=vocab_size - 1)
    return CLIPTextModel(cfg).eval()


def tiny_sd_pipeline(folder: Path, *, seed: int = 0):
    """StableDiffusionPipeline: 8x8x4 latents, 16x16 images, DDIM scheduler, no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    m = tiny_models(seed=seed)
    torch.manual_seed(seed)
    tok = tiny_tokenizer(folder)
    pipe = StableDiffusionPipeline(
        vae=m.vae, text_encoder=_text_encoder(len(tok)), tokenizer=tok, unet=m.unet,
        scheduler=DDIMScheduler.from_config(m.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_unclip_pipeline(folder: Path, *, seed: int = 0):
    """StableUnCLIPImg2ImgPipeline: the tiny UNet with a projection class embedding fed by the noise-augmented
    CLIP image embedding (PROJ_DIM) concatenated with its noise-level embedding."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    m = tiny_models(seed=seed, image_embed_dim=2 * PROJ_DIM)
    torch.manual_seed(seed)
    tok = tiny_tokenizer(folder)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, projection_dim=PROJ_DIM, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, image_size=16, patch_size=4, num_channels=3)).eval()
    processor = CLIPImageProcessor(crop_size=16, size=16)
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=processor, image_encoder=vision,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=PROJ_DIM),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), tokenizer=tok,
        text_encoder=_text_encoder(len(tok)), unet=m.unet,
        scheduler=DDIMScheduler.from_config(m.scheduler.config), vae=m.vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe
