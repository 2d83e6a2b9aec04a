#!/usr/bin/env python
"""Tiny random-weight pipelines of the model families beyond SD-1.5, built offline: SDXL
(``StableDiffusionXLPipeline``), SD3 (``StableDiffusion3Pipeline``) and Flux.1 (``FluxPipeline``).

Each one has the real family's parts and wiring (two CLIP text encoders for SDXL, two CLIP plus a T5 for SD3,
CLIP plus T5 for Flux; a flow-matching scheduler and a VAE shift factor for SD3 and Flux; Flux's packed latents
and guidance embedding) at a size that renders in a second on a CPU. The widths, the resolution and the seed are
arguments, so that a test can build a pipeline that no other test has seen.

    python examples/make_tiny_families.py OUT_DIR [--families sdxl,sd3,flux] [--resolution 32] [--width 32]

Each family lands in OUT_DIR/<family> and loads with ``diffusers.DiffusionPipeline.from_pretrained``.
"""

import argparse
import json
import string
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from make_tiny_assets import (  # noqa: E402
    DEFAULT_CAPTIONS,
    MODEL_MAX_LENGTH,
    build_clip_tokenizer,
    tiny_clip_text,
    tiny_vae,
)

FAMILIES = ("sdxl", "sd3", "flux")
T5_SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: T5's pad, eos and unk


def build_t5_tokenizer(output_dir, texts=None):
    """A word-level T5 tokenizer (``T5TokenizerFast`` over a ``tokenizers`` Unigram model) whose vocabulary is the
    words of `texts` plus each ASCII letter, digit and punctuation mark, so any lower-cased ASCII text encodes
    without an unknown token (the input is lower-cased first); "</s>" is appended to every sequence, as
    T5's tokenizer does. Written with ``save_pretrained`` (tokenizer.json). Returns `output_dir`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    texts = list(texts or DEFAULT_CAPTIONS)
    words = sorted({w.lower() for t in texts for w in t.split()})
    chars = sorted(
        {c for t in texts for c in t.lower()} | set(string.ascii_lowercase + string.digits + string.punctuation)
    )
    pieces = [(s, 0.0) for s in T5_SPECIAL] + [("\u2581" + w, -1.0) for w in words]
    pieces += [(c, -5.0) for c in chars if c != " "] + [("\u2581", -5.0)]
    seen, vocab = set(), []
    for piece, score in pieces:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    tokenizer.save_pretrained(str(output_dir))
    return Path(output_dir)


def _t5_text(tokenizer, d_model, seed):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=d_model // 4,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _tokenizers(names):
    """The tokenizers a pipeline takes, by component name: T5 for names ending in "_t5", CLIP otherwise (built in
    a temporary folder; the pipeline's save_pretrained writes them into its own)."""
    import tempfile

    from transformers import CLIPTokenizer, T5TokenizerFast

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if name.endswith("_t5"):
                out[name] = T5TokenizerFast.from_pretrained(str(build_t5_tokenizer(Path(tmp) / name)))
            else:
                out[name] = CLIPTokenizer.from_pretrained(str(build_clip_tokenizer(Path(tmp) / name)))
    return out


def build_tiny_sdxl(output_dir, resolution=32, width=32, seed=0):
    """``StableDiffusionXLPipeline``: CLIPTextModel + CLIPTextModelWithProjection (hidden `width` each), a UNet
    with SDXL's text_time conditioning (cross-attention dim 2 x width, pooled embedding + 6 size/crop ids),
    the leading-spacing Euler scheduler of SDXL, an fp32-upcast VAE."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    output_dir = Path(output_dir)
    toks = _tokenizers(["tokenizer", "tokenizer_2"])
    time_dim = 8
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=resolution // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * time_dim + width,
        cross_attention_dim=2 * width,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        num_train_timesteps=1000,
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(resolution, seed + 1, scaling_factor=0.13025),
        text_encoder=tiny_clip_text(toks["tokenizer"], width, with_projection=False, seed=seed),
        text_encoder_2=tiny_clip_text(toks["tokenizer_2"], width, with_projection=True, seed=seed + 3),
        tokenizer=toks["tokenizer"],
        tokenizer_2=toks["tokenizer_2"],
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    return _save(pipe, output_dir, ["tokenizer", "tokenizer_2"])


def build_tiny_sd3(output_dir, resolution=32, width=32, seed=0):
    """``StableDiffusion3Pipeline``: two CLIPTextModelWithProjection (hidden `width`), a T5 encoder (d_model
    2 x width: the CLIP states, concatenated, are padded to it), an SD3Transformer2DModel, the flow-matching Euler
    scheduler (shift 3) and a VAE with SD3's scaling and shift factors."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    output_dir = Path(output_dir)
    toks = _tokenizers(["tokenizer", "tokenizer_2", "tokenizer_3_t5"])
    torch.manual_seed(seed + 2)
    transformer = SD3Transformer2DModel(
        sample_size=resolution // 2,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=2 * width,
        caption_projection_dim=32,
        pooled_projection_dim=2 * width,
        pos_embed_max_size=resolution,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(resolution, seed + 1, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=tiny_clip_text(toks["tokenizer"], width, with_projection=True, seed=seed),
        tokenizer=toks["tokenizer"],
        text_encoder_2=tiny_clip_text(toks["tokenizer_2"], width, with_projection=True, seed=seed + 3),
        tokenizer_2=toks["tokenizer_2"],
        text_encoder_3=_t5_text(toks["tokenizer_3_t5"], 2 * width, seed + 4),
        tokenizer_3=toks["tokenizer_3_t5"],
    )
    return _save(pipe, output_dir, ["tokenizer", "tokenizer_2"])


def build_tiny_flux(output_dir, resolution=32, width=32, seed=0):
    """``FluxPipeline`` shaped like Flux.1-dev: CLIPTextModel (pooled, hidden `width`), a T5 encoder (d_model
    2 x width), a FluxTransformer2DModel with the guidance embedding over 2x2-packed latents (4 VAE channels ->
    16), the dynamically shifted flow-matching Euler scheduler and a VAE with Flux's scaling and shift factors."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    output_dir = Path(output_dir)
    toks = _tokenizers(["tokenizer", "tokenizer_2_t5"])
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=2 * width,
        pooled_projection_dim=width,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(resolution, seed + 1, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=tiny_clip_text(toks["tokenizer"], width, with_projection=False, seed=seed),
        tokenizer=toks["tokenizer"],
        text_encoder_2=_t5_text(toks["tokenizer_2_t5"], 2 * width, seed + 4),
        tokenizer_2=toks["tokenizer_2_t5"],
        transformer=transformer,
    )
    return _save(pipe, output_dir, ["tokenizer"])


def _save(pipe, output_dir, clip_tokenizers):
    """save_pretrained, then our own CLIP tokenizer files again, so that each CLIP tokenizer folder keeps the
    vocab.json + merges.txt layout whatever the installed transformers writes."""
    pipe.save_pretrained(str(output_dir), safe_serialization=True)
    for name in clip_tokenizers:
        build_clip_tokenizer(output_dir / name)
    index = json.loads((output_dir / "model_index.json").read_text())
    assert index["_class_name"] == type(pipe).__name__
    return output_dir


BUILDERS = {"sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"Comma-separated, of {', '.join(FAMILIES)}.")
    p.add_argument("--resolution", type=int, default=32, help="Image size (a multiple of 4).")
    p.add_argument("--width", type=int, default=32, help="CLIP hidden size (a multiple of 4); T5's is twice it.")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    families = [f.strip() for f in a.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        p.error(f"--families: unknown {unknown}; the families are {', '.join(FAMILIES)}")
    if a.resolution % 4 or a.resolution < 8:
        p.error(f"--resolution must be a multiple of 4 and at least 8, got {a.resolution}")
    if a.width % 4 or a.width < 8:
        p.error(f"--width must be a multiple of 4 and at least 8, got {a.width}")
    for family in families:
        out = BUILDERS[family](Path(a.output_dir) / family, resolution=a.resolution, width=a.width, seed=a.seed)
        print(f"{family}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
