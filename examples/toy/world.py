"""A procedural text-to-image world where every image can be judged exactly.

Scenes are coloured shapes on a dark grey background, drawn from a seed. Two levels:
  - one object at a position:           "a red circle on the left"
  - two objects and a spatial relation: "a red circle above a blue square" (two different colours)
4 colours x 3 shapes x 4 positions = 48 one-object captions, 12 x 9 x 4 = 432 two-object captions.
The vocabulary (palette, shapes, positions, relations) is written to world.json, which the judge
(scorers/toy.py) reads to parse captions and drawings; nothing here imports the project.

    python examples/toy/world.py --output_dir toy_data     # parquets + world.json (see build_datasets)
"""

import argparse
import io
import json
import random
from pathlib import Path

import numpy as np

COLOURS = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.16, 0.72, 0.22),
    "blue": (0.22, 0.36, 0.95),
    "yellow": (0.95, 0.86, 0.18),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
RELATIONS = ("above", "below", "left of", "right of")
BACKGROUND = (0.2, 0.2, 0.2)
SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down: smooth edges


def world_spec():
    """What the judge needs to parse captions and drawings (written to world.json)."""
    return {
        "colours": COLOURS,
        "shapes": list(SHAPES),
        "positions": list(POSITIONS),
        "relations": list(RELATIONS),
        "background": BACKGROUND,
    }


def all_captions():
    single = [f"a {c} {s} on the {p}" for c in COLOURS for s in SHAPES for p in POSITIONS]
    pairs = [
        f"a {c1} {s1} {r} a {c2} {s2}"
        for c1 in COLOURS
        for s1 in SHAPES
        for r in RELATIONS
        for c2 in COLOURS
        for s2 in SHAPES
        if c1 != c2
    ]
    return single + pairs


def parse_caption(caption):
    """A caption -> its scene: list of (colour, shape) objects, plus 'position' or 'relation'."""
    words = caption.split()
    if " on the " in caption:
        return {"objects": [(words[1], words[2])], "position": words[-1]}
    rel = next(r for r in sorted(RELATIONS, key=len, reverse=True) if f" {r} a " in caption)
    head, tail = caption.split(f" {rel} ")
    return {"objects": [tuple(head.split()[1:3]), tuple(tail.split()[1:3])], "relation": rel}


# ----------------------------------------------------------------------------- drawing


def _shape_mask(shape, cx, cy, r, size):
    """Boolean mask (size x size) of a shape centred at (cx, cy) with half-size r, in pixel units."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xs - cx) <= r * 0.9) & (np.abs(ys - cy) <= r * 0.9)
    # an upward triangle inside the box [cx-r, cx+r] x [cy-r, cy+r]
    inside_y = (ys >= cy - r) & (ys <= cy + r)
    half_width = (ys - (cy - r)) / 2.0
    return inside_y & (np.abs(xs - cx) <= half_width)


def _placements(scene, rng, size):
    """Centres and half-sizes that satisfy the scene's position or relation with a clear margin."""
    n = len(scene["objects"])
    for _ in range(1000):
        rs = [rng.uniform(0.15, 0.2) * size for _ in range(n)]
        cs = [(rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)) for r in rs]
        if n == 1:
            dx, dy = cs[0][0] - size / 2, cs[0][1] - size / 2
            want = scene["position"]
        else:
            (x1, y1), (x2, y2) = cs
            if max(abs(x1 - x2) - rs[0] - rs[1], abs(y1 - y2) - rs[0] - rs[1]) < 1.0:
                continue  # the two shapes would touch
            dx, dy = x1 - x2, y1 - y2  # object 1 relative to object 2
            want = {"left of": "left", "right of": "right", "above": "top", "below": "bottom"}[scene["relation"]]
        axis, sign = (
            (dx, -1 if want == "left" else 1) if want in ("left", "right") else (dy, -1 if want == "top" else 1)
        )
        other = dy if want in ("left", "right") else dx
        if axis * sign >= 0.18 * size and abs(axis) >= 1.6 * abs(other):
            return cs, rs
    raise RuntimeError(f"cannot place {scene}")


def render(caption, seed, size=32):
    """An RGB uint8 array (size x size x 3) that depicts `caption`, drawn from `seed`."""
    rng = random.Random(f"{caption}|{seed}")
    scene = parse_caption(caption)
    centres, radii = _placements(scene, rng, size)
    big = size * SUPERSAMPLE
    bg = np.array(BACKGROUND) + rng.uniform(-0.03, 0.03)
    img = np.broadcast_to(bg, (big, big, 3)).copy()
    for (colour, shape), (cx, cy), r in zip(scene["objects"], centres, radii):
        rgb = np.clip(np.array(COLOURS[colour]) + [rng.uniform(-0.06, 0.06) for _ in range(3)], 0, 1)
        mask = _shape_mask(shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE, big)
        img[mask] = rgb
    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return (img * 255).round().astype(np.uint8)


def wrong_caption(caption, rng):
    """The same scene with one attribute changed (a colour, a shape, the position or the relation)."""
    scene = parse_caption(caption)
    objects = [list(o) for o in scene["objects"]]
    choice = rng.randrange(3)
    i = rng.randrange(len(objects))
    if choice == 0:
        taken = {o[0] for o in objects}
        objects[i][0] = rng.choice([c for c in COLOURS if c not in taken])
    elif choice == 1:
        objects[i][1] = rng.choice([s for s in SHAPES if s != objects[i][1]])
    if len(objects) == 1:
        pos = scene["position"] if choice < 2 else rng.choice([p for p in POSITIONS if p != scene["position"]])
        return f"a {objects[0][0]} {objects[0][1]} on the {pos}"
    rel = scene["relation"] if choice < 2 else rng.choice([r for r in RELATIONS if r != scene["relation"]])
    return f"a {objects[0][0]} {objects[0][1]} {rel} a {objects[1][0]} {objects[1][1]}"


def vague_caption(caption, rng):
    """A less specific caption of the same scene (the pretraining set's 'web caption')."""
    scene = parse_caption(caption)
    objects = scene["objects"]
    if len(objects) == 1:
        (c, s), p = objects[0], scene["position"]
        return rng.choice([f"a {c} {s}", f"a {s} on the {p}", f"a {c} shape on the {p}", f"a {s}"])
    (c1, s1), (c2, s2) = objects
    return rng.choice(
        [
            f"a {c1} {s1} and a {c2} {s2}",
            f"a {c1} shape {scene['relation']} a {c2} shape",
            f"a {s1} {scene['relation']} a {s2}",
            "two shapes",
        ]
    )


# ----------------------------------------------------------------------------- datasets


def png_bytes(array):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def split_captions(seed=0, eval_fraction=0.2):
    """(fine-tuning captions, held-out evaluation captions): a fixed split of all captions."""
    captions = all_captions()
    rng = random.Random(seed)
    held = set(rng.sample(range(len(captions)), int(len(captions) * eval_fraction)))
    return [c for i, c in enumerate(captions) if i not in held], [c for i, c in enumerate(captions) if i in held]


def build_datasets(output_dir, size=32, pretrain_images=6000, finetune_per_caption=1, seed=0):
    """Write into output_dir:
    - world.json: the vocabulary (for the judge);
    - pretrain.parquet (image, caption): a broad, noisy set over *all* captions (the 'web data' theta_0 is
      pretrained on): 45% exact captions, 30% vague ones, 25% with one attribute wrong;
    - finetune_pickapic.parquet (caption, jpg_0, jpg_1, label_0, label_1): the fine-tuning set, about one
      image per fine-tuning caption; the winner is a correct image, the loser the same caption drawn with one
      attribute wrong (honest Diffusion-DPO pairs); winners are jpg_0 or jpg_1 at random;
    - finetune.parquet (image, caption): the winners alone;
    - eval_prompts.txt: the held-out captions (never in the fine-tuning set);
    - shuffled_pretrain.parquet (image, caption): the pretraining images with their captions shuffled (a model
      trained on it learns images but no prompt-following: the judges' null model)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "world.json").write_text(json.dumps(world_spec() | {"resolution": size}, indent=2) + "\n")
    rng = random.Random(seed)
    finetune, held_out = split_captions(seed)
    everything = all_captions()

    rows = {"image": [], "caption": []}
    for n in range(pretrain_images):
        caption = rng.choice(everything)
        image = render(caption, seed=10_000 + n, size=size)
        u = rng.random()
        text = caption if u < 0.55 else vague_caption(caption, rng) if u < 0.8 else wrong_caption(caption, rng)
        rows["image"].append({"bytes": png_bytes(image), "path": None})
        rows["caption"].append(text)
    pq.write_table(pa.table(rows), out / "pretrain.parquet")
    shuffled = list(rows["caption"])
    random.Random(seed + 1).shuffle(shuffled)
    pq.write_table(pa.table({"image": rows["image"], "caption": shuffled}), out / "shuffled_pretrain.parquet")

    pick = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    plain = {"image": [], "caption": []}
    for i, caption in enumerate(finetune):
        for j in range(finetune_per_caption):
            good = png_bytes(render(caption, seed=1_000_000 + i * 100 + j, size=size))
            bad = png_bytes(render(wrong_caption(caption, rng), seed=2_000_000 + i * 100 + j, size=size))
            first = rng.random() < 0.5
            pick["caption"].append(caption)
            pick["jpg_0"].append(good if first else bad)
            pick["jpg_1"].append(bad if first else good)
            pick["label_0"].append(1 if first else 0)
            pick["label_1"].append(0 if first else 1)
            plain["image"].append({"bytes": good, "path": None})
            plain["caption"].append(caption)
    pq.write_table(pa.table(pick), out / "finetune_pickapic.parquet")
    pq.write_table(pa.table(plain), out / "finetune.parquet")
    (out / "eval_prompts.txt").write_text("\n".join(held_out) + "\n")
    return {"finetune": finetune, "held_out": held_out}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--pretrain_images", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    split = build_datasets(args.output_dir, args.resolution, args.pretrain_images, seed=args.seed)
    print(f"{len(split['finetune'])} fine-tuning captions, {len(split['held_out'])} held-out; wrote {args.output_dir}")


if __name__ == "__main__":
    main()
