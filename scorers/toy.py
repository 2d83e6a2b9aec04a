"""Judges for the toy world of examples/toy/ (coloured shapes with positions and relations), as evaluate.py
metrics: they score how well images follow their prompts there, exactly, where the four reward models
only approximate human taste.

- `toy_adherence`: 1 if the drawing shows exactly what the caption says (the right objects, colours,
  shapes and position or relation), else 0. An exact parser of the drawing: pixels are assigned to the
  nearest palette colour, each colour's largest connected blob is an object, its fill of its bounding box
  tells the shape (square ~1, circle ~0.79, triangle ~0.5) and its centroid the position.
- `toy_attributes`: the share of the caption's checks that hold (each object's colour and shape, the
  position or relation, no extra object): a smoother view of the same parse.
- `toy_fd`: a distribution metric per model, lower is better: the Frechet distance between the judge's
  description of each drawing (per colour: presence, shape fill, position, size; plus stray pixels and
  sharpness) over the model's images and over real images of the same prompts (drawn by the world).

The judge folder (`--toy_judge DIR`) holds world.json (palette and vocabulary), written by
examples/toy/build_base.py. Nothing is trained: the judges are exact, so a reconstruction-blurred or
generated image is judged by the same rules as a real one.
"""

import json
from collections import deque
from pathlib import Path

import numpy as np

MIN_AREA = 10 / 1024  # smallest blob counted as an object, as a share of the image (10 px at 32x32)
TOLERANCE = 0.28  # max RGB distance (0-1 scale) from a palette colour for a pixel to belong to it
SHAPE_NAMES = ("circle", "square", "triangle")
TEMPLATE_BLUR = (
    2  # passes of blur on the ideal shapes: a blurred square stays closer to a blurred square than to a circle
)
GROW = 2  # pixels around a blob that count towards its soft coverage (blurred edges)


def _template(shape, cx, cy, area, h, w, ss=4):
    """Soft coverage (h x w) of the ideal shape with this area and centroid (a triangle points up; its centroid
    lies a third of its half-height below the centre of its box)."""
    ys, xs = (np.mgrid[0 : h * ss, 0 : w * ss] + 0.5) / ss
    if shape == "circle":
        r = np.sqrt(area / np.pi)
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    elif shape == "square":
        half = np.sqrt(area) / 2
        mask = (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    else:
        r = np.sqrt(area / 2)
        top = cy - r / 3 - r
        mask = (ys >= top) & (ys <= top + 2 * r) & (np.abs(xs - cx) <= (ys - top) / 2)
    soft = mask.reshape(h, ss, w, ss).mean(axis=(1, 3))
    for _ in range(TEMPLATE_BLUR):  # a [1, 2, 1] / 4 blur per pass, like the softening of a decoded image
        soft = np.pad(soft, 1, mode="edge")
        soft = (soft[:-2] + 2 * soft[1:-1] + soft[2:]) / 4
        soft = (soft[:, :-2] + 2 * soft[:, 1:-1] + soft[:, 2:]) / 4
    return soft


def parse_caption(caption, world):
    """A caption -> {"objects": [(colour, shape), ...], "position" or "relation"}; None if it is not the world's."""
    words = caption.lower().split()
    if " on the " in caption.lower():
        ok = (
            len(words) == 6
            and words[1] in world["colours"]
            and words[2] in world["shapes"]
            and words[5] in world["positions"]
        )
        if not ok:
            return None
        return {"objects": [(words[1], words[2])], "position": words[5]}
    for rel in sorted(world["relations"], key=len, reverse=True):
        head, sep, tail = caption.lower().partition(f" {rel} ")
        if sep:
            a, b = head.split(), tail.split()
            if (
                len(a) == 3
                and len(b) == 3
                and all(x[1] in world["colours"] and x[2] in world["shapes"] for x in (a, b))
            ):
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
    """{colour: {"shape", "x", "y", "area", "fill", "cornered"}} for every palette colour with a blob big enough to be
    an object.
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
        # Soft coverage of each pixel by this colour (edges are antialiased or blurred mixtures with the
        # background), inside the blob grown by GROW pixels and away from the other colours' blobs.
        region = np.zeros((h, w), bool)
        region[ys, xs] = True
        grown = region.copy()
        for _ in range(GROW):
            edge = grown.copy()
            grown[1:] |= edge[:-1]
            grown[:-1] |= edge[1:]
            grown[:, 1:] |= edge[:, :-1]
            grown[:, :-1] |= edge[:, 1:]
        grown &= ~(close & (nearest != k) & (nearest != len(names)))
        axis = palette[k] - bg
        alpha = np.clip(((arr - bg) @ axis) / (axis @ axis), 0, 1) * grown
        # The shape whose ideal drawing, at the blob's soft area and centroid, best matches its soft coverage. The
        # VAE's blur smooths all three candidates alike, so this holds on decoded images too, where a square's fill
        # ratio drifts towards a circle's.
        area_soft = alpha.sum()
        yy, xx = np.mgrid[0:h, 0:w] + 0.5
        cy, cx = (alpha * yy).sum() / area_soft, (alpha * xx).sum() / area_soft
        errors = {name: ((alpha - _template(name, cx, cy, area_soft, h, w)) ** 2).sum() for name in SHAPE_NAMES}
        shape = min(errors, key=errors.get)
        fill = alpha.sum() / max(alpha.sum(1).max() * alpha.sum(0).max(), 1e-6)
        cornered = errors["circle"] - min(errors["square"], errors["triangle"])  # > 0: a cornered shape fits better
        objects[colour] = {
            "shape": shape,
            "x": (xs.mean() + 0.5) / w,
            "y": (ys.mean() + 0.5) / h,
            "area": area,
            "fill": float(fill),
            "cornered": float(cornered),
        }
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
        out.append(
            a in found
            and b in found
            and _direction(found[a]["x"] - found[b]["x"], found[a]["y"] - found[b]["y"]) == rel
        )
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


def drawing_features(image, world):
    """The judge's description of a drawing as a vector: per palette colour (presence, and if present its shape
    fill, vertical mass offset, centroid x and y, area share), plus the share of pixels near no palette colour
    nor the background (blur, smudges) and the mean gradient magnitude (sharpness)."""
    found = parse_drawing(image, world)
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    h, w, _ = arr.shape
    out = []
    for colour in world["colours"]:
        o = found.get(colour)
        out += [1.0, o["fill"], o["cornered"], o["x"], o["y"], o["area"] / (h * w)] if o else [0.0] * 6
    palette = np.array(list(world["colours"].values()) + [world["background"]], dtype=np.float32)
    stray = (np.linalg.norm(arr[:, :, None, :] - palette[None, None], axis=-1).min(-1) > TOLERANCE).mean()
    grad = np.abs(np.diff(arr, axis=0)).mean() + np.abs(np.diff(arr, axis=1)).mean()
    return np.array(out + [stray, grad], dtype=np.float64)


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to two feature sets (rows are samples)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    vals, vecs = np.linalg.eigh(s1)
    root1 = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    cross = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


class ToyFD:
    """Per model: the Frechet distance between the judge's drawing features (`drawing_features`) of its images and
    those of real images of the same prompts, drawn by the world's renderer (8 per prompt, fixed seeds)."""

    kind = "distribution"

    def __init__(self, judge, **_):
        self.world = load_world(judge)
        self._reference = {}  # prompts -> real features: computed once, shared by every model scored

    def reference(self, prompts):
        """Real images of these prompts from the world renderer (examples/toy/world.py), 8 per prompt."""
        import importlib.util

        from PIL import Image

        path = Path(__file__).resolve().parent.parent / "examples" / "toy" / "world.py"
        spec = importlib.util.spec_from_file_location("toy_world", path)  # the renderer the prompts come from
        world = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(world)
        res = self.world.get("resolution", 32)
        return [Image.fromarray(world.render(p, seed=5_000_000 + j, size=res)) for p in prompts for j in range(8)]

    def distribution(self, images, prompts):
        key = tuple(sorted(set(prompts)))
        if key not in self._reference:
            self._reference[key] = np.stack([drawing_features(im, self.world) for im in self.reference(list(key))])
        real = self._reference[key]
        fake = np.stack([drawing_features(im, self.world) for im in images])
        return frechet_distance(fake, real)
