"""Judges for the toy world of examples/toy/ (coloured shapes with positions and relations), as evaluate.py
metrics: they score how well images follow their prompts there, exactly, where the four reward models
only approximate human taste.

- `toy_adherence`: 1 if the drawing shows exactly what the caption says (the right objects, colours,
  shapes and position or relation), else 0. An exact parser of the drawing: pixels are assigned to the
  nearest palette colour, each colour's largest connected blob is an object, its fill of its bounding box
  tells the shape (square ~1, circle ~0.79, triangle ~0.5) and its centroid the position.
- `toy_attributes`: the share of the caption's checks that hold (each object's colour and shape, the
  position or relation, no extra object): a smoother view of the same parse.
- `toy_fd`: a distribution metric per model, lower is better: the Frechet distance between the
  judge network's penultimate features of the model's images and those of real images of the same
  prompts (drawn by the world, cached with the judge).

The judge folder (`--toy_judge DIR`) holds world.json (palette and vocabulary), and for toy_fd the feature
network (config.json + model.safetensors) and `reference_images.npz` (real images per prompt). Built by
examples/toy/build_base.py.
"""

import json
from collections import deque
from pathlib import Path

import numpy as np

MIN_AREA = 10 / 1024  # smallest blob counted as an object, as a share of the image (10 px at 32x32)
TOLERANCE = 0.28  # max RGB distance (0-1 scale) from a palette colour for a pixel to belong to it


def parse_caption(caption, world):
    """A caption -> {"objects": [(colour, shape), ...], "position" or "relation"}; None if it is not the world's."""
    words = caption.lower().split()
    if " on the " in caption.lower():
        ok = len(words) == 6 and words[1] in world["colours"] and words[2] in world["shapes"] and words[5] in world["positions"]
        if not ok:
            return None
        return {"objects": [(words[1], words[2])], "position": words[5]}
    for rel in sorted(world["relations"], key=len, reverse=True):
        head, sep, tail = caption.lower().partition(f" {rel} ")
        if sep:
            a, b = head.split(), tail.split()
            if len(a) == 3 and len(b) == 3 and all(x[1] in world["colours"] and x[2] in world["shapes"] for x in (a, b)):
                return {"objects": [(a[1], a[2]), (b[1], b[2])], "relation": rel}
    return None


def _largest_blob(mask):
    """(area, ys, xs) of the largest 4-connected component of a boolean mask."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best = (0, None, None)
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, ys, xs = deque([(y0, x0)]), [], []
        while queue:
            y, x = queue.popleft()
            ys.append(y)
            xs.append(x)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(ys) > best[0]:
            best = (len(ys), np.array(ys), np.array(xs))
    return best


def parse_drawing(image, world):
    """{colour: {"shape", "x", "y", "area"}} for every palette colour with a blob big enough to be an object.
    x and y are the blob's centroid in [0, 1] (y grows downwards)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    h, w, _ = arr.shape
    names = list(world["colours"])
    palette = np.array([world["colours"][c] for c in names] + [world["background"]], dtype=np.float32)
    dist = np.linalg.norm(arr[:, :, None, :] - palette[None, None], axis=-1)
    nearest = dist.argmin(-1)
    close = dist.min(-1) <= TOLERANCE
    bg = palette[-1]
    objects = {}
    for k, colour in enumerate(names):
        area, ys, xs = _largest_blob((nearest == k) & close)
        if area < MIN_AREA * h * w:
            continue
        # Soft coverage of each pixel by this colour (edges are antialiased mixtures with the background),
        # inside the blob grown by one pixel: the shape's widest row and tallest column, measured exactly.
        region = np.zeros((h, w), bool)
        region[ys, xs] = True
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown &= ~(close & (nearest != k) & (nearest != len(names)))
        axis = palette[k] - bg
        alpha = np.clip(((arr - bg) @ axis) / (axis @ axis), 0, 1) * grown
        fill = alpha.sum() / max(alpha.sum(1).max() * alpha.sum(0).max(), 1e-6)
        rows = alpha.sum(1)  # a triangle (apex up) has its mass low in its extent; circles and squares are symmetric
        extent = np.nonzero(rows >= 0.5)[0]
        centre = (rows * np.arange(h)).sum() / rows.sum()
        low = (centre - (extent.min() + extent.max()) / 2) / (extent.max() - extent.min() + 1)
        shape = "triangle" if low >= 0.055 or fill < 0.64 else "square" if fill >= 0.94 else "circle"
        objects[colour] = {"shape": shape, "x": (xs.mean() + 0.5) / w, "y": (ys.mean() + 0.5) / h, "area": area,
                           "fill": float(fill), "low": float(low)}
    return objects


def _direction(dx, dy):
    """The dominant direction of a displacement (image coordinates: y grows downwards)."""
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def checks(caption, image, world):
    """The list of booleans a caption asks of an image (empty if the caption is not in the world)."""
    scene = parse_caption(caption, world)
    if scene is None:
        return []
    found = parse_drawing(image, world)
    wanted = [c for c, _ in scene["objects"]]
    out = []
    for colour, shape in scene["objects"]:
        out += [colour in found, colour in found and found[colour]["shape"] == shape]
    out.append(set(found) <= set(wanted))  # nothing else drawn
    if "position" in scene:
        c = wanted[0]
        out.append(c in found and _direction(found[c]["x"] - 0.5, found[c]["y"] - 0.5) == scene["position"])
    else:
        a, b = wanted
        rel = {"left of": "left", "right of": "right", "above": "top", "below": "bottom"}[scene["relation"]]
        out.append(a in found and b in found and _direction(found[a]["x"] - found[b]["x"], found[a]["y"] - found[b]["y"]) == rel)
    return out


def load_world(judge):
    path = Path(judge) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"--toy_judge {judge}: no world.json there (build it with examples/toy/build_base.py)")
    return json.loads(path.read_text())


class ToyAdherence:
    """1 if the image shows exactly what the prompt says, else 0 (prompts outside the world score 0)."""

    def __init__(self, judge, strict=True, **_):
        self.world, self.strict = load_world(judge), strict

    def score(self, images, prompts):
        out = []
        for image, prompt in zip(images, prompts):
            c = checks(prompt, image, self.world)
            out.append(float(bool(c) and all(c)) if self.strict else (sum(c) / len(c) if c else 0.0))
        return out


class ToyFeatures:
    """The judge network: a small CNN trained (examples/toy/build_base.py) to tell each colour's shape and place
    on real images and their VAE reconstructions; its penultimate layer gives the features of toy_fd."""

    @staticmethod
    def build(config):
        import torch.nn as nn

        c = config["channels"]
        return nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.SiLU(), nn.Conv2d(2 * c, 2 * c, 3, padding=1, stride=2), nn.SiLU(),
            nn.Flatten(), nn.LazyLinear(config["features"]), nn.SiLU(), nn.Linear(config["features"], config["outputs"]))

    @classmethod
    def load(cls, folder, device="cpu"):
        import torch
        from safetensors.torch import load_file

        config = json.loads((Path(folder) / "config.json").read_text())
        net = cls.build(config)
        net(torch.zeros(1, 3, config["resolution"], config["resolution"]))  # materialise the lazy layer
        net.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
        return net.to(device).eval(), config


def image_batch(images, resolution):
    """PIL images -> float tensor (N, 3, R, R) in [-1, 1]."""
    import torch

    arrs = [np.asarray(im.convert("RGB").resize((resolution, resolution)), dtype=np.float32) / 127.5 - 1 for im in images]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)


def features(net, images, resolution, device="cpu", batch_size=256):
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = image_batch(images[i:i + batch_size], resolution).to(device)
            out.append(net[:-1](x).double().cpu().numpy())
    return np.concatenate(out)


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to two feature sets (rows are samples)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    vals, vecs = np.linalg.eigh(s1)
    root1 = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    cross = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


class ToyFD:
    """Per model: the Frechet distance of its images' judge features to real images of the same prompts."""

    kind = "distribution"

    def __init__(self, judge, device="cpu", batch_size=256, **_):
        self.world = load_world(judge)
        self.net, self.config = ToyFeatures.load(judge, device)
        self.device, self.batch_size = device, batch_size
        self.judge = Path(judge)

    def reference(self, prompts):
        """Real images of these prompts from the world renderer (examples/toy/world.py), 8 per prompt."""
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "toy"))
        import world  # the toy world's renderer: judged prompts must come from it
        from PIL import Image

        res = self.world.get("resolution", 32)
        return [Image.fromarray(world.render(p, seed=5_000_000 + j, size=res)) for p in prompts for j in range(8)]

    def distribution(self, images, prompts):
        real = features(self.net, self.reference(sorted(set(prompts))), self.config["resolution"], self.device, self.batch_size)
        fake = features(self.net, images, self.config["resolution"], self.device, self.batch_size)
        return frechet_distance(fake, real)
