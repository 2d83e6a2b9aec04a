#!/usr/bin/env python
"""Check the toy judges before trusting them: they must score real images of the held-out prompts (and their
VAE reconstructions) near 100%, and a model that learned no prompt-following near chance.

    python examples/toy/validate_judges.py --base_dir toy_results/base --output_dir toy_results/judges

Writes OUTPUT_DIR/judges.json and prints a table:
  real          real images of the held-out prompts (new seeds), judged against their own prompts
  reconstructed the same images through the VAE (what a perfect latent model could at best produce)
  chance        real images judged against the prompt of another image (a shuffled pairing)
  shuffled-sft  a UNet pretrained like theta_0 but on shuffled captions (train_sft.py), through evaluate.py
FD is computed against the judge's real reference images of the same prompts (other seeds).
"""

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "examples", ROOT / "examples" / "toy"):
    sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import world  # noqa: E402
from PIL import Image  # noqa: E402

from scorers.toy import ToyAdherence, ToyFD  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base_dir", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--images_per_prompt", type=int, default=3)
    p.add_argument(
        "--shuffled_steps", type=int, default=200, help="train_sft.py steps of the shuffled-caption model (0: skip)."
    )
    a = p.parse_args(argv)
    base, out = Path(a.base_dir), Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    judge = base / "judge"
    prompts = [x for x in (base / "data" / "eval_prompts.txt").read_text().split("\n") if x]
    jobs = [(pr, j) for pr in prompts for j in range(a.images_per_prompt)]
    real = [Image.fromarray(world.render(pr, seed=9_000_000 + j)) for pr, j in jobs]
    texts = [pr for pr, _ in jobs]

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(base / "theta0"), subfolder="vae").eval()
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1 for im in real])).permute(0, 3, 1, 2)
    with torch.no_grad():
        y = torch.cat(
            [vae.decode(vae.encode(x[i : i + 256]).latent_dist.mode()).sample for i in range(0, len(x), 256)]
        )
    recon = [
        Image.fromarray(((v.permute(1, 2, 0).clamp(-1, 1).numpy() + 1) * 127.5).round().astype(np.uint8)) for v in y
    ]
    other = list(texts)
    random.Random(0).shuffle(other)

    strict, soft, fd = ToyAdherence(judge), ToyAdherence(judge, strict=False), ToyFD(judge)
    rows = {}
    for name, images, against in (("real", real, texts), ("reconstructed", recon, texts), ("chance", real, other)):
        rows[name] = {
            "toy_adherence": float(np.mean(strict.score(images, against))),
            "toy_attributes": float(np.mean(soft.score(images, against))),
            "toy_fd": fd.distribution(images, texts),
        }

    if a.shuffled_steps:
        import evaluate as ev
        import train_sft

        model = out / "shuffled-sft"
        if not (model / "model_index.json").exists():
            train_sft.main(
                train_sft.parse_args(
                    [
                        "--pretrained_model_name_or_path",
                        str(base / "init"),
                        "--dataset_name",
                        str(base / "data" / "shuffled_pretrain.parquet"),
                        "--image_column",
                        "image",
                        "--resolution",
                        "32",
                        "--center_crop",
                        "--proportion_empty_prompts",
                        "0.1",
                        "--train_batch_size",
                        "64",
                        "--max_train_steps",
                        str(a.shuffled_steps),
                        "--learning_rate",
                        "1e-3",
                        "--lr_scheduler",
                        "cosine",
                        "--lr_warmup_steps",
                        "20",
                        "--adam_weight_decay",
                        "0",
                        "--report_to",
                        "none",
                        "--checkpointing_steps",
                        str(a.shuffled_steps),
                        "--output_dir",
                        str(model),
                    ]
                )
            )
        res = ev.main(
            ev.parse_args(
                [
                    "--prompts",
                    str(base / "data" / "eval_prompts.txt"),
                    "--metrics",
                    "toy_adherence,toy_attributes,toy_fd",
                    "--toy_judge",
                    str(judge),
                    "--model",
                    f"theta0={base / 'theta0'}",
                    "--model",
                    f"shuffled-sft={model}",
                    "--resolution",
                    "32",
                    "--num_inference_steps",
                    "10",
                    "--guidance_scale",
                    "3",
                    "--num_images_per_prompt",
                    str(a.images_per_prompt),
                    "--batch_size",
                    "96",
                    "--output_dir",
                    str(out / "eval"),
                ]
            )
        )
        for name in ("theta0", "shuffled-sft"):
            rows[name] = {
                k: v.get("mean", v.get("value"))
                for k, v in res["summary"][name].items()
                if k in ("toy_adherence", "toy_attributes", "toy_fd")
            }
    (out / "judges.json").write_text(
        json.dumps({"prompts": len(prompts), "images_per_prompt": a.images_per_prompt, "rows": rows}, indent=2) + "\n"
    )
    print("| images | adherence | attributes | FD |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['toy_adherence']:.3f} | {r['toy_attributes']:.3f} | {r['toy_fd']:.2f} |")


if __name__ == "__main__":
    main()
