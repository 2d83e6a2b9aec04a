#!/usr/bin/env python
"""Build the toy world's base model theta_0 from scratch, and its judge, on a CPU in minutes.

Into --output_dir (each step is skipped when its output is already there, so a rerun resumes):
  data/      the world's datasets (examples/toy/world.py): noisy pretraining set, fine-tuning set
             (Pick-a-Pic-shaped and plain), held-out prompts, shuffled-caption set
  init/      a StableDiffusionPipeline: CLIP BPE tokenizer over the world's words, a frozen random
             CLIPTextModel, a VAE trained here (f=4: 32x32 images -> 8x8x4 latents), a random UNet, DDIM
  theta0/    the base model: init/'s UNet pretrained with train_sft.py on the broad, noisy set
             (vague and wrong captions, 10% empty prompts for classifier-free guidance)
  judge/     world.json for the exact judges: evaluate.py --metrics toy_adherence,toy_fd --toy_judge judge/

    python examples/toy/build_base.py --output_dir toy_base [--pretrain_steps 600]
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "examples", ROOT / "examples" / "toy"):
    sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import world  # noqa: E402

UNET_CONFIG = dict(  # 0.8M parameters; attention at the 8x8 level only (at 32 px; sample_size follows the resolution)
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)


def log(msg):
    print(f"[build_base {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def images_tensor(arrays):
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(images, steps, seed, batch_size=32):
    """An AutoencoderKL with 3 blocks (f=4), trained with MSE + 1e-4 KL; scaling_factor = 1 / std of the latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=images.shape[-1],
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(gen)).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-4 * posterior.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, min(len(images), 2048), 256)]
        )
        recon = torch.cat(
            [vae.decode(vae.encode(images[i : i + 256]).latent_dist.mean).sample for i in range(0, 512, 256)]
        )
    mse = torch.nn.functional.mse_loss(recon, images[:512]).item()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    log(f"vae: reconstruction MSE {mse:.4f} on [-1, 1]; scaling_factor {vae.config.scaling_factor:.3f}")
    return vae, mse


SLOTS = ("colour 1", "shape 1", "colour 2", "shape 2", "position", "relation")


def caption_slots(caption):
    """What a (possibly vague) caption states, slot by slot; 0 = not stated."""
    colours, shapes = list(world.COLOURS), list(world.SHAPES)
    words = caption.replace("left of", "left-of").replace("right of", "right-of").split()
    found = {s: 0 for s in SLOTS}
    obj = 1
    for w in words:
        if w in colours:
            found[f"colour {obj}"] = 1 + colours.index(w)
        elif w in shapes:
            found[f"shape {obj}"] = 1 + shapes.index(w)
        elif w in ("above", "below", "left-of", "right-of"):
            found["relation"] = 1 + ["above", "below", "left-of", "right-of"].index(w)
            obj = 2
        elif w == "and":
            obj = 2
        elif w in world.POSITIONS and "on the" in caption:
            found["position"] = 1 + world.POSITIONS.index(w)
    return [found[s] for s in SLOTS]


def train_text_encoder(text_encoder, tokenizer, captions, seed, steps=200):
    """Train the toy text encoder to state each caption's content (its colours, shapes, position or relation, in
    order) in its final hidden states, so the UNet's cross-attention has something to read. A frozen random
    encoder mixes the words too weakly for a 0.8M-parameter UNet to learn prompt-following in minutes."""
    sizes = (5, 4, 5, 4, 5, 5)
    torch.manual_seed(seed)
    heads = torch.nn.Linear(text_encoder.config.hidden_size, sum(sizes))
    ids = tokenizer(
        captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    targets = torch.tensor([caption_slots(c) for c in captions])
    opt = torch.optim.AdamW(list(text_encoder.parameters()) + list(heads.parameters()), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    text_encoder.train()
    for step in range(steps):
        idx = torch.randint(0, len(captions), (128,), generator=gen)
        states = text_encoder(ids[idx])[0]  # (B, 77, H): every state after the caption sees all of it
        logits = heads(states[:, -8:].mean(1)).split(sizes, dim=-1)
        loss = sum(torch.nn.functional.cross_entropy(lg, targets[idx, k]) for k, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    text_encoder.eval()
    with torch.no_grad():
        logits = heads(text_encoder(ids)[0][:, -8:].mean(1)).split(sizes, dim=-1)
        acc = float(torch.stack([lg.argmax(-1) == targets[:, k] for k, lg in enumerate(logits)]).float().mean())
    log(f"text encoder: slot accuracy {acc:.3f} over {len(captions)} captions (loss {loss.item():.3f})")
    return acc


def build_init(out, data, size, vae_steps, seed):
    """init/: tokenizer, frozen random text encoder, trained VAE, random UNet, DDIM scheduler."""
    import datasets
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from make_tiny_assets import SD15_SCHEDULER_KWARGS, build_clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    words = world.all_captions() + ["a red shape and a blue shape left of right of above below two shapes"]
    tok_dir = build_clip_tokenizer(out / "tokenizer_src", texts=words, max_merges=300)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    ds = datasets.load_dataset("parquet", data_files=str(data / "pretrain.parquet"), split="train")
    te_accuracy = train_text_encoder(
        text_encoder, tokenizer, sorted(set(ds["caption"]) | set(world.all_captions())), seed
    )
    import io

    from PIL import Image

    arrays = [np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("RGB")) for r in ds["image"][:4000]]
    vae, mse = train_vae(images_tensor(arrays), vae_steps, seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**UNET_CONFIG | {"sample_size": size // 4})
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, **SD15_SCHEDULER_KWARGS),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out / "init"), safe_serialization=True)
    build_clip_tokenizer(out / "init" / "tokenizer", texts=words, max_merges=300)  # keep the CLIP file layout
    return {"vae_reconstruction_mse": mse, "text_encoder_slot_accuracy": te_accuracy}


def pretrain_theta0(out, data, size, steps, seed, lr=1e-3, batch_size=64):
    """theta0/: train_sft.py on the broad, noisy pretraining set, from init/."""
    import train_sft

    args = train_sft.parse_args(
        [
            "--pretrained_model_name_or_path",
            str(out / "init"),
            "--dataset_name",
            str(data / "pretrain.parquet"),
            "--image_column",
            "image",
            "--caption_column",
            "caption",
            "--resolution",
            str(size),
            "--center_crop",
            "--cache_latents",
            "--proportion_empty_prompts",
            "0.1",
            "--train_batch_size",
            str(batch_size),
            "--max_train_steps",
            str(steps),
            "--learning_rate",
            str(lr),
            "--lr_scheduler",
            "cosine",
            "--lr_warmup_steps",
            "20",
            "--adam_weight_decay",
            "0",
            "--checkpointing_steps",
            str(steps),
            "--checkpoints_total_limit",
            "1",
            "--resume_from_checkpoint",
            "latest",
            "--report_to",
            "none",
            "--seed",
            str(seed),
            "--num_validation_images",
            "4",
            "--validation_num_inference_steps",
            "10",
            "--output_dir",
            str(out / "theta0"),
        ]
    )
    train_sft.main(args)


def write_judge(out, size):
    """judge/world.json: the vocabulary and palette the exact judges (scorers/toy.py) read."""
    judge = out / "judge"
    judge.mkdir(parents=True, exist_ok=True)
    (judge / "world.json").write_text(json.dumps(world.world_spec() | {"resolution": size}, indent=2) + "\n")


def build(output_dir, size=32, pretrain_images=6000, vae_steps=400, pretrain_steps=800, seed=0):
    """Every step whose output is missing; returns the build's record (also in build.json)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "build.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    settings = {
        "resolution": size,
        "pretrain_images": pretrain_images,
        "vae_steps": vae_steps,
        "pretrain_steps": pretrain_steps,
        "seed": seed,
    }
    if record.get("settings", settings) != settings:
        raise SystemExit(f"error: {out} was built with other settings {record['settings']}; use another --output_dir")
    record["settings"] = settings
    data = out / "data"
    steps = [
        (
            "data",
            data / "eval_prompts.txt",
            lambda: world.build_datasets(data, size, pretrain_images, seed=seed) and {},
        ),
        ("init", out / "init" / "model_index.json", lambda: build_init(out, data, size, vae_steps, seed)),
        ("judge", out / "judge" / "world.json", lambda: write_judge(out, size)),
        (
            "theta0",
            out / "theta0" / "model_index.json",
            lambda: pretrain_theta0(out, data, size, pretrain_steps, seed),
        ),
    ]
    for name, done, run in steps:
        if done.exists():
            continue
        log(f"building {name}")
        t = time.time()
        record |= run() or {}
        record[f"seconds_{name}"] = round(time.time() - t, 1)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--pretrain_images", type=int, default=6000)
    p.add_argument("--vae_steps", type=int, default=400)
    p.add_argument("--pretrain_steps", type=int, default=800, help="train_sft.py steps (batch 64) for theta_0.")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(
        json.dumps(
            build(a.output_dir, a.resolution, a.pretrain_images, a.vae_steps, a.pretrain_steps, a.seed), indent=2
        )
    )


if __name__ == "__main__":
    main()
