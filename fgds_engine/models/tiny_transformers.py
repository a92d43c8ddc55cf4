"""Tiny random pipelines of the transformer families (SD3, Flux, PixArt-Sigma, Sana): no weights, no network.

The component sizes follow diffusers' own tests of these pipelines, scaled to 16x16 images; tokenizers are
built in code (a byte-level CLIP one from ``tiny.tiny_tokenizer``; a byte-level fast tokenizer with T5's /
Gemma's special tokens for the T5 and Gemma encoders), so nothing is downloaded.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .contracts import freeze

TINY_FLOW_KINDS = ("sd3", "flux", "flux-dev", "pixart", "sana")
_T5_DIM = 32  # tiny T5 / Gemma width (the transformers' joint attention / caption width)


def byte_tokenizer(*, bos: str | None, eos: str | None, pad: str, extra: tuple[str, ...] = ()):
    """A fast tokenizer over the 256 bytes (one token per byte, no merges) with the given special tokens:
    what a T5 or Gemma tokenizer does to a prompt, in shape (ids, padding, truncation, mask)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [pad, *(t for t in (eos, bos) if t), "<unk>", *extra]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    single = " ".join([*([bos] if bos else []), "$A", *([eos] if eos else [])])
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, vocab[t]) for t in (bos, eos) if t])
    kw = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, unk_token="<unk>",
                                   model_max_length=4096, **kw)


def _t5(seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok = byte_tokenizer(bos=None, eos="</s>", pad="<pad>")
    enc = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=_T5_DIM, d_kv=8, d_ff=37, num_layers=2,
                                  num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                  eos_token_id=1, decoder_start_token_id=0)).eval()
    return enc, tok


def _clip(seed: int, *, projection: bool, hidden: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .tiny import tiny_tokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer(Path(tmp))
    n = len(tok)
    cfg = CLIPTextConfig(vocab_size=n, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=n - 2,
                         eos_token_id=n - 1, pad_token_id=n - 1, projection_dim=hidden)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()
    return model, tok


def _vae_kl(seed: int, *, latent_channels: int, scaling: float, shift: float | None):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=16, scaling_factor=scaling,
        shift_factor=shift, use_quant_conv=shift is None, use_post_quant_conv=shift is None)


def tiny_flow_pipeline(kind: str, *, seed: int = 0):
    """A tiny random pipeline of a transformer family (16x16 images).

    kind "sd3": StableDiffusion3Pipeline (two CLIP encoders with projections and T5; 16 latent channels, the
    VAE's shift_factor; FlowMatchEuler with shift 3). "flux": FluxPipeline without guidance embedding
    (FLUX.1-schnell's; true CFG with a negative prompt); "flux-dev": with it (FLUX.1-dev's
    guidance-distilled model); both CLIP + T5, packed 2x2 latents, FlowMatchEuler with dynamic shifting.
    "pixart": PixArtSigmaPipeline (T5 with its attention mask, learned-sigma output, DPM-Solver++).
    "sana": SanaPipeline (Gemma-style encoder and its instruction prefix, a DC-AE decoder, DPM-Solver with
    flow prediction).
    """
    if kind not in TINY_FLOW_KINDS:
        raise ValueError(f"tiny transformer pipeline kind must be one of {', '.join(TINY_FLOW_KINDS)}, "
                         f"got {kind!r}")
    pipe = {"sd3": _sd3, "flux": _flux, "flux-dev": _flux, "pixart": _pixart, "sana": _sana}[kind](seed, kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd3(seed, kind):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    enc, tok = _clip(seed, projection=True)
    enc_2, tok_2 = _clip(seed + 1, projection=True)
    enc_3, tok_3 = _t5(seed + 2)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=_T5_DIM, pooled_projection_dim=32, out_channels=16,
        pos_embed_max_size=16)
    vae = _vae_kl(seed, latent_channels=16, scaling=1.5305, shift=0.0609)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    freeze(transformer, vae, enc, enc_2, enc_3)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=enc,
                                    tokenizer=tok, text_encoder_2=enc_2, tokenizer_2=tok_2,
                                    text_encoder_3=enc_3, tokenizer_3=tok_3)


def _flux(seed, kind):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    enc, tok = _clip(seed, projection=False)
    enc_2, tok_2 = _t5(seed + 2)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=_T5_DIM, pooled_projection_dim=16,
        guidance_embeds=kind == "flux-dev", axes_dims_rope=(2, 2, 4))
    vae = _vae_kl(seed, latent_channels=4, scaling=0.3611, shift=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    freeze(transformer, vae, enc, enc_2)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=enc,
                        tokenizer=tok, text_encoder_2=enc_2, tokenizer_2=tok_2)


def _pixart(seed, kind):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    enc, tok = _t5(seed + 2)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=_T5_DIM, in_channels=4, cross_attention_dim=24, out_channels=8,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    vae = _vae_kl(seed, latent_channels=4, scaling=0.13025, shift=None)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                            num_train_timesteps=1000)
    freeze(transformer, vae, enc)
    return PixArtSigmaPipeline(tokenizer=tok, text_encoder=enc, vae=vae, transformer=transformer,
                               scheduler=scheduler)


def _sana(seed, kind):
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed + 2)
    tok = byte_tokenizer(bos="<bos>", eos="<eos>", pad="<pad>")
    enc = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=_T5_DIM, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=2,
                                   eos_token_id=1, sliding_window=64)).eval()
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=_T5_DIM, sample_size=8, patch_size=1)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (5,), (5,)), decoder_qkv_multiscales=((), (5,), (5,)),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        upsample_block_type="interpolate", downsample_block_type="stride_conv", decoder_norm_types="rms_norm",
        decoder_act_fns="silu", scaling_factor=0.41407)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            flow_shift=3.0)
    freeze(transformer, vae, enc)
    return SanaPipeline(tokenizer=tok, text_encoder=enc, vae=vae, transformer=transformer,
                        scheduler=scheduler)
