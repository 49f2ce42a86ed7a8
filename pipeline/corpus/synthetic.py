"""The synthetic captioned-scenes corpus behind `dsmd corpus`.

Each image shows 1 to 3 coloured, patterned shapes on a plain or lightly textured light background.
Colours, shapes and patterns follow a Zipf-like law (`corpus.zipf`): a few values are common, the
tail is rare, as concepts are in real captions. Every caption is determined by the scene: it names
each object's size, pattern, colour and shape, the spatial
relation `objects[0] <relation> objects[1]` when there are two or more objects, and the object's
region of the picture when there is one. Captions are 2-5 paraphrases drawn from a small grammar with
synonyms ("a small red circle left of a large blue square", "there is a big azure box, and a little
crimson disc is on its left", ...).

With probability `near_duplicate_fraction` a scene copies the previous scene of its shard and
changes exactly one thing: one object's colour, shape or size, the relation (the two objects swap
places), the two objects' colours, or (single object) its region. Such pairs make retrieval
non-trivial and give the FAISS miner meaningful hard negatives.

Two corpora of the same world, as in real distillation: the `web` split (only the demo teacher
trains on it; many times the target train split, with no scene description of the target test split)
and the target splits train / val / test, which extraction, the students and evaluation use. Every
split draws from its own random stream. Test scenes are unambiguous: no two test scenes share a
description (`description()`), so no test caption describes another test image.

Output (img2dataset layout): `{out_dir}/{split}-{NNNNNN}.tar` with `{key}.png|jpg`, `{key}.txt`
(captions, one a line) and `{key}.json` (key, captions, scene, near-duplicate source), plus
`{out_dir}/manifest.yaml`. Same config and seed -> byte-identical shards: each shard has its own
random generator seeded by (seed, split, shard index), and tar headers are fixed (mtime 0, uid/gid
0, mode 0644).
"""
from __future__ import annotations

import copy
import collections
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw
from pipeline.common.progress import progress as progress_bar

from pipeline.common import names
from pipeline.common.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, prepare_output_dir
from pipeline.common.config import ConfigError, CorpusConfig
from pipeline.corpus.manifest import CLASSNAMES_FILE, TEMPLATES_FILE, write_manifest

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump when the output for a given config changes
# The world: vocabulary, grammar and renderer. A teacher pretrained on one world version understands
# only it; the manifest and the demo teacher's card record it, and extraction refuses a mismatch.
# Bump it with any change to COLOURS, SHAPES, PATTERNS, the captions' grammar or render().
WORLD_NAME = "synthetic-shapes"
WORLD_VERSION = 3
SPLITS = ("train", "val", "test", "web")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "web": 3, "world": 4}
REPORT_NAME, MANIFEST_NAME, CONFIG_RECORD = names.CORPUS_REPORT, names.CORPUS_MANIFEST, names.CORPUS_CONFIG_RECORD
CORPUS_NAME = "synthetic-shapes"
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG"}
SUPERSAMPLE = 2  # shapes are drawn at 2x and box-filtered down: cheap anti-aliasing

# ---- vocabulary --------------------------------------------------------------------------------
# canonical name -> (RGB, caption words); every word set is disjoint from the others
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {  # in Zipf rank order
    "red": ((210, 35, 35), ("red", "crimson", "scarlet")),
    "blue": ((35, 70, 215), ("blue", "azure", "cobalt")),
    "green": ((35, 150, 50), ("green", "emerald", "grass-green")),
    "yellow": ((235, 200, 0), ("yellow", "golden", "lemon")),
    "black": ((25, 25, 25), ("black", "ebony", "jet-black")),
    "orange": ((240, 135, 20), ("orange", "tangerine", "amber")),
    "purple": ((130, 45, 175), ("purple", "violet", "plum")),
    "pink": ((240, 105, 175), ("pink", "rosy", "bubblegum")),
    "brown": ((125, 75, 35), ("brown", "chocolate", "chestnut")),
    "cyan": ((0, 185, 200), ("cyan", "turquoise", "aqua")),
    "grey": ((128, 128, 128), ("grey", "gray", "ash")),
    "navy": ((20, 30, 110), ("navy", "indigo", "ink")),
    "olive": ((128, 128, 0), ("olive", "khaki", "moss")),
    "maroon": ((120, 20, 45), ("maroon", "burgundy", "wine")),
    "lime": ((150, 230, 40), ("lime", "chartreuse", "pistachio")),
    "teal": ((0, 120, 120), ("teal", "petrol", "spruce")),
}
SHAPES: dict[str, tuple[str, ...]] = {  # in Zipf rank order
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangular shape"),
    "star": ("star", "five-pointed star"),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus", "lozenge"),
    "hexagon": ("hexagon", "six-sided shape"),
    "pentagon": ("pentagon", "five-sided shape"),
    "arrow": ("arrow", "arrowhead"),
    "crescent": ("crescent", "moon shape"),
}
PATTERNS: dict[str, tuple[str, ...]] = {  # in Zipf rank order
    "solid": ("solid", "filled", "plain"),
    "striped": ("striped", "stripy", "banded"),
    "outlined": ("outlined", "hollow", "outline-only"),
}
SIZES: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
SIZE_RADIUS = {"small": 0.10, "large": 0.17}  # circumradius as a fraction of the image side
# relation of objects[0] to objects[1]
RELATIONS: dict[str, tuple[str, ...]] = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath"),
}
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
# "there is B, and A is <side>": where A is, seen from B
SIDE_PHRASES = {
    "left": ("on its left", "to its left"),
    "right": ("on its right", "to its right"),
    "above": ("above it", "over it"),
    "below": ("below it", "under it"),
}
# 3 x 3 grid of the picture, by (row, column)
REGION_NAMES = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
REGION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "in the upper left", "at the top left"),
    "top": ("at the top", "near the top edge", "in the upper middle"),
    "top right": ("in the top right corner", "in the upper right", "at the top right"),
    "left": ("on the left side", "at the left edge", "on the left"),
    "center": ("in the center", "in the middle", "at the centre"),
    "right": ("on the right side", "at the right edge", "on the right"),
    "bottom left": ("in the bottom left corner", "in the lower left", "at the bottom left"),
    "bottom": ("at the bottom", "near the bottom edge", "in the lower middle"),
    "bottom right": ("in the bottom right corner", "in the lower right", "at the bottom right"),
}
ONE_OBJECT_TEMPLATES = (
    "{O} {R}",
    "there is {O} {R}",
    "{R}, {O}",
    "a picture of {O} {R}",
    "{O} sitting {R}",
    "one {size} {pattern} {colour} {shape}, {R}",
)
TWO_OBJECT_TEMPLATES = (
    "{A} {rel} {B}",
    "{B} {inv} {A}",
    "there is {B}, and {A} is {side}",
    "{A} and {B}, the {colourA} {shapeA} {rel} the {colourB} {shapeB}",
    "a picture of {A} {rel} {B}",
    "{B} with {A} {side}",
)
THIRD_OBJECT_SUFFIXES = (", and {C}", ", along with {C}", "; there is also {C}")
MAX_CAPTIONS = min(len(ONE_OBJECT_TEMPLATES), len(TWO_OBJECT_TEMPLATES))

OBJECT_COUNT_PROBS = (0.30, 0.40, 0.30)  # 1, 2 or 3 objects
BACKGROUND_TONES = ((236, 234, 228), (226, 230, 234), (240, 233, 220), (228, 234, 224), (244, 244, 244))
TEXTURES = ("plain", "noise", "gradient")
GAP = 0.05  # minimum free space between two objects, as a fraction of the image side
NOT_CONTENT_FIELDS = ("out_dir", "workers")  # config fields that do not change the shards' bytes
MUTATIONS = ("colour", "shape", "size", "pattern", "relation", "swap_colours", "position")
STRIPE_PERIOD = 8  # supersampled pixels per stripe pair (4 px in the image)


# ---- scenes ------------------------------------------------------------------------------------
@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str  # small | large
    x: float  # (pattern below, with a default: records of generator version 1 have none)  # centre, in pixels of the final image
    y: float
    pattern: str = "solid"


@dataclass
class Scene:
    objects: list[SceneObject]
    relation: str | None  # objects[0] relative to objects[1]; None for one object
    background: dict[str, Any]  # {"tone": [r, g, b], "texture": plain|noise|gradient, "texture_seed": int}

    def to_dict(self) -> dict[str, Any]:
        # written out rather than dataclasses.asdict: this runs once per image and asdict is slow
        return {
            "objects": [
                {"shape": o.shape, "colour": o.colour, "size": o.size, "pattern": o.pattern, "x": o.x, "y": o.y} for o in self.objects
            ],
            "relation": self.relation,
            "background": dict(self.background),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Scene":
        return cls(
            objects=[SceneObject(**o) for o in data["objects"]],
            relation=data["relation"],
            background=dict(data["background"]),
        )


def radius(obj: SceneObject, image_size: int) -> float:
    return SIZE_RADIUS[obj.size] * image_size


def region(obj: SceneObject, image_size: int) -> str:
    """Which cell of the 3 x 3 grid the object's centre falls in."""
    col = min(2, int(obj.x * 3 / image_size))
    row = min(2, int(obj.y * 3 / image_size))
    return REGION_NAMES[row][col]


def _relation_holds(a: SceneObject, b: SceneObject, relation: str, image_size: int) -> bool:
    """a is clearly `relation` of b: separated along that axis by both radii plus a gap, and the
    offset along the other axis at most half as large (so "left of" is not "above")."""
    dx, dy = b.x - a.x, b.y - a.y
    along = {"left": dx, "right": -dx, "above": dy, "below": -dy}[relation]
    across = abs(dy) if relation in ("left", "right") else abs(dx)
    need = radius(a, image_size) + radius(b, image_size) + GAP * image_size
    return along >= need and across <= 0.5 * along


def layout_ok(scene: Scene, image_size: int) -> bool:
    """Objects inside the picture, not touching, all distinct, and the relation true."""
    objs = scene.objects
    for o in objs:
        r = radius(o, image_size)
        if not (r + 1 <= o.x <= image_size - r - 1 and r + 1 <= o.y <= image_size - r - 1):
            return False
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            a, b = objs[i], objs[j]
            if (a.colour, a.shape) == (b.colour, b.shape):
                return False  # "the red circle" must name one object
            dist = float(np.hypot(a.x - b.x, a.y - b.y))
            if dist < radius(a, image_size) + radius(b, image_size) + GAP * image_size:
                return False
    if len(objs) >= 2:
        return scene.relation is not None and _relation_holds(objs[0], objs[1], scene.relation, image_size)
    return scene.relation is None


def _place(rng: np.random.Generator, scene: Scene, index: int, image_size: int, tries: int = 8) -> bool:
    """Give objects[index] a position valid with objects[:index], drawing 64 candidates at a time."""
    obj = scene.objects[index]
    r = radius(obj, image_size)
    lo, hi = r + 1, image_size - r - 1
    placed = scene.objects[: index + 1]
    trial = Scene(placed, scene.relation if index >= 1 else None, scene.background)
    for _ in range(tries):
        cand = rng.uniform(lo, hi, size=(64, 2))
        ok = np.ones(64, dtype=bool)
        for other in scene.objects[:index]:
            dist = np.hypot(cand[:, 0] - other.x, cand[:, 1] - other.y)
            ok &= dist >= r + radius(other, image_size) + GAP * image_size
        if index == 1:  # vectorised relation check against objects[0]
            a = scene.objects[0]
            dx, dy = cand[:, 0] - a.x, cand[:, 1] - a.y
            along = {"left": dx, "right": -dx, "above": dy, "below": -dy}[scene.relation]
            across = np.abs(dy) if scene.relation in ("left", "right") else np.abs(dx)
            ok &= (along >= r + radius(a, image_size) + GAP * image_size) & (across <= 0.5 * along)
        for k in np.flatnonzero(ok):
            # rounded so the JSON scene holds exactly the coordinates that were checked and drawn
            obj.x, obj.y = round(float(cand[k, 0]), 2), round(float(cand[k, 1]), 2)
            if layout_ok(trial, image_size):
                return True
    return False


@functools.lru_cache(maxsize=64)
def zipf_probs(n: int, exponent: float) -> np.ndarray:
    """p(rank r) proportional to 1 / (r + 1) ** exponent, r = 0..n-1 (exponent 0: uniform); read-only (cached)."""
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    probs = weights / weights.sum()
    probs.flags.writeable = False
    return probs


def _draw(rng: np.random.Generator, vocabulary: dict, zipf: float, exclude: str | None = None) -> str:
    names = [n for n in vocabulary if n != exclude]
    return names[int(rng.choice(len(names), p=zipf_probs(len(names), zipf)))]


def random_scene(rng: np.random.Generator, image_size: int, zipf: float = 0.0) -> Scene:
    """A fresh scene: 1-3 distinct objects (colour, shape and pattern Zipf-distributed with exponent
    `zipf`), a relation between the first two, a background."""
    background = {
        "tone": list(BACKGROUND_TONES[rng.integers(len(BACKGROUND_TONES))]),
        "texture": TEXTURES[rng.integers(len(TEXTURES))],
        "texture_seed": int(rng.integers(2**31)),
    }
    while True:
        n_objects = int(rng.choice(3, p=OBJECT_COUNT_PROBS)) + 1
        objects: list[SceneObject] = []
        while len(objects) < n_objects:
            obj = SceneObject(
                shape=_draw(rng, SHAPES, zipf),
                colour=_draw(rng, COLOURS, zipf),
                size=("small", "large")[rng.integers(2)],
                x=0.0,
                y=0.0,
                pattern=_draw(rng, PATTERNS, zipf),
            )
            if all((obj.colour, obj.shape) != (o.colour, o.shape) for o in objects):
                objects.append(obj)
        relation = tuple(RELATIONS)[rng.integers(len(RELATIONS))] if n_objects >= 2 else None
        scene = Scene(objects, relation, background)
        if all(_place(rng, scene, i, image_size) for i in range(n_objects)):
            return scene
        # rare (three large objects that do not fit): draw another scene


def mutate(rng: np.random.Generator, scene: Scene, image_size: int, zipf: float = 0.0) -> tuple[Scene, str] | None:
    """A near-duplicate: a copy of `scene` with exactly one change, and the change's name
    (one of MUTATIONS); None when no change keeps the layout valid."""
    n = len(scene.objects)
    kinds = ["colour", "shape", "size", "pattern"] + (["relation", "swap_colours"] if n >= 2 else ["position"])
    for _ in range(12):
        kind = kinds[rng.integers(len(kinds))]
        new = copy.deepcopy(scene)
        i = int(rng.integers(n))
        if kind == "colour":
            new.objects[i].colour = _draw(rng, COLOURS, zipf, exclude=new.objects[i].colour)
        elif kind == "shape":
            new.objects[i].shape = _draw(rng, SHAPES, zipf, exclude=new.objects[i].shape)
        elif kind == "pattern":
            new.objects[i].pattern = _draw(rng, PATTERNS, zipf, exclude=new.objects[i].pattern)
        elif kind == "size":
            new.objects[i].size = "small" if new.objects[i].size == "large" else "large"
        elif kind == "relation":  # the two related objects trade places
            a, b = new.objects[0], new.objects[1]
            a.x, a.y, b.x, b.y = b.x, b.y, a.x, a.y
            new.relation = INVERSE[new.relation]
        elif kind == "swap_colours":
            a, b = new.objects[0], new.objects[1]
            if a.colour == b.colour:
                continue
            a.colour, b.colour = b.colour, a.colour
        elif kind == "position":
            old_region = region(new.objects[0], image_size)
            if not _place(rng, new, 0, image_size) or region(new.objects[0], image_size) == old_region:
                continue
        if layout_ok(new, image_size):
            return new, kind
    return None


# ---- captions ----------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[rng.integers(len(words))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _object_words(rng: np.random.Generator, obj: SceneObject) -> tuple[str, str, str, str]:
    return (_pick(rng, SIZES[obj.size]), _pick(rng, PATTERNS[obj.pattern]), _pick(rng, COLOURS[obj.colour][1]),
            _pick(rng, SHAPES[obj.shape]))


def _object_phrase(rng: np.random.Generator, obj: SceneObject) -> str:
    return _with_article(" ".join(_object_words(rng, obj)))


def caption(rng: np.random.Generator, scene: Scene, template: int, image_size: int) -> str:
    """Caption number `template` of the scene's grammar, synonyms drawn from `rng`."""
    objs = scene.objects
    if len(objs) == 1:
        size, pattern, colour, shape = _object_words(rng, objs[0])
        return ONE_OBJECT_TEMPLATES[template].format(
            O=_with_article(f"{size} {pattern} {colour} {shape}"),
            R=_pick(rng, REGION_PHRASES[region(objs[0], image_size)]),
            size=size,
            pattern=pattern,
            colour=colour,
            shape=shape,
        )
    a, b = objs[0], objs[1]
    text = TWO_OBJECT_TEMPLATES[template].format(
        A=_object_phrase(rng, a),
        B=_object_phrase(rng, b),
        rel=_pick(rng, RELATIONS[scene.relation]),
        inv=_pick(rng, RELATIONS[INVERSE[scene.relation]]),
        side=_pick(rng, SIDE_PHRASES[scene.relation]),
        colourA=_pick(rng, COLOURS[a.colour][1]),
        shapeA=_pick(rng, SHAPES[a.shape]),
        colourB=_pick(rng, COLOURS[b.colour][1]),
        shapeB=_pick(rng, SHAPES[b.shape]),
    )
    for extra in objs[2:]:
        text += _pick(rng, THIRD_OBJECT_SUFFIXES).format(C=_object_phrase(rng, extra))
    return text


def captions_for(rng: np.random.Generator, scene: Scene, image_size: int, min_captions: int, max_captions: int) -> list[str]:
    """min..max distinct paraphrases, each from a different template."""
    count = int(rng.integers(min_captions, max_captions + 1))
    n_templates = len(ONE_OBJECT_TEMPLATES) if len(scene.objects) == 1 else len(TWO_OBJECT_TEMPLATES)
    templates = rng.choice(n_templates, size=count, replace=False)
    return [caption(rng, scene, int(t), image_size) for t in templates]


# ---- rendering ---------------------------------------------------------------------------------
def _unit_polygon(shape: str) -> np.ndarray | None:
    """Vertices on the unit circumcircle (y down); None for the circle and crescent (drawn from ellipses)."""
    if shape == "circle":
        return None
    if shape == "square":
        s = 1 / np.sqrt(2)
        return np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "diamond":
        return np.array([[0, -1], [0.7, 0], [0, 1], [-0.7, 0]])
    if shape == "hexagon":
        angles = np.deg2rad(np.arange(6) * 60)
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "star":
        angles = np.deg2rad(-90 + np.arange(10) * 36)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if shape == "pentagon":
        angles = np.deg2rad(-90 + np.arange(5) * 72)
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "arrow":  # pointing up: a head on a shaft
        return np.array([[0, -1], [0.8, -0.1], [0.3, -0.1], [0.3, 1], [-0.3, 1], [-0.3, -0.1], [-0.8, -0.1]])
    if shape == "crescent":  # drawn as a disc minus an offset disc (see _shape_mask)
        return None
    if shape == "cross":
        w = 0.33
        return np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1],
                         [-w, w], [-1, w], [-1, -w], [-w, -w]])
    raise ValueError(f"unknown shape {shape!r}")


UNIT_POLYGONS = {shape: _unit_polygon(shape) for shape in SHAPES}


def _background(scene: Scene, image_size: int) -> np.ndarray:
    bg = scene.background
    tone = np.asarray(bg["tone"], dtype=np.float32)
    if bg["texture"] == "plain":
        pixels = np.broadcast_to(tone, (image_size, image_size, 3))
    elif bg["texture"] == "noise":
        noise = np.random.default_rng(bg["texture_seed"]).normal(0.0, 5.0, size=(image_size, image_size, 1))
        pixels = tone + noise
    else:  # gradient: a faint linear ramp in a direction given by the texture seed
        angle = (bg["texture_seed"] % 360) * np.pi / 180
        ramp = np.linspace(-1.0, 1.0, image_size, dtype=np.float32)
        field = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
        pixels = tone + 12.0 * field[:, :, None]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _shape_mask(obj: SceneObject, big: int, scale: float) -> Image.Image:
    """The object's filled silhouette as an 'L' mask of the supersampled picture."""
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = obj.x * scale, obj.y * scale
    r = SIZE_RADIUS[obj.size] * big
    polygon = UNIT_POLYGONS[obj.shape]
    if polygon is not None:
        draw.polygon([tuple(p) for p in (polygon * r + np.array([cx, cy])).tolist()], fill=255)
        return mask
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    if obj.shape == "crescent":  # bite out a disc offset to the right
        ox = cx + 0.45 * r
        draw.ellipse([ox - 0.85 * r, cy - 0.85 * r, ox + 0.85 * r, cy + 0.85 * r], fill=0)
    return mask


@functools.lru_cache(maxsize=4)
def _stripes(big: int) -> Image.Image:
    """Diagonal stripes over the whole supersampled picture (255 = paint)."""
    yy, xx = np.mgrid[0:big, 0:big]
    return Image.fromarray(np.where((xx + yy) % STRIPE_PERIOD < STRIPE_PERIOD // 2, 255, 0).astype(np.uint8), "L")


def _erode(mask: Image.Image, width: int) -> Image.Image:
    """PIL's MinFilter(2 * width + 1), pixel for pixel (a test checks it), as a separable running minimum:
    8x faster, which matters when the world is rendered on the fly for the demo teacher."""
    pixels = np.asarray(mask)
    padded = np.pad(pixels, width, mode="edge")
    n, k = pixels.shape[0], 2 * width + 1
    rows = padded[:, :n].copy()
    for shift in range(1, k):
        np.minimum(rows, padded[:, shift : shift + n], out=rows)
    out = rows[:n].copy()
    for shift in range(1, k):
        np.minimum(out, rows[shift : shift + n], out=out)
    return Image.fromarray(out, "L")


def _pattern_mask(mask: Image.Image, pattern: str, big: int, r: float) -> Image.Image:
    """Where to paint the object's colour: all of the silhouette (solid), its rim plus diagonal
    stripes (striped), or only a rim (outlined). Rims come from eroding the silhouette by a share of
    the circumradius `r`, so small shapes keep an unpainted inside."""
    if pattern == "solid":
        return mask
    width = max(1, round((0.1 if pattern == "striped" else 0.18) * r))
    rim = ImageChops.subtract(mask, _erode(mask, width))
    if pattern == "outlined":
        return rim
    return ImageChops.lighter(rim, ImageChops.multiply(mask, _stripes(big)))


def render(scene: Scene, image_size: int) -> Image.Image:
    """The scene as an RGB image (shapes drawn at SUPERSAMPLE x and reduced: anti-aliased edges)."""
    big = image_size * SUPERSAMPLE
    image = Image.fromarray(_background(scene, image_size), "RGB").resize((big, big), Image.Resampling.NEAREST)
    for obj in scene.objects:
        paint = _pattern_mask(_shape_mask(obj, big, SUPERSAMPLE), obj.pattern, big, radius(obj, big))
        image.paste(COLOURS[obj.colour][0], (0, 0, big, big), paint)
    return image.reduce(SUPERSAMPLE) if big != image_size else image


def encode(image: Image.Image, image_format: str) -> bytes:
    """Deterministic encoding (no timestamps or metadata): PNG or baseline JPEG quality 90."""
    buf = io.BytesIO()
    if image_format == "png":
        image.save(buf, format="PNG", compress_level=3)  # smallest and fast on these images
    else:
        image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ---- shards ------------------------------------------------------------------------------------
def _tar_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    archive.addfile(info, io.BytesIO(data))


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:07d}"


def shard_name(split: str, shard_index: int) -> str:
    return f"{split}-{shard_index:06d}.tar"


def split_sizes(cfg: CorpusConfig) -> dict[str, int]:
    return {"train": cfg.train_images, "val": cfg.val_images, "test": cfg.test_images, "web": cfg.web_images}


def shard_plan(cfg: CorpusConfig) -> list[tuple[str, int, int, int]]:
    """(split, shard index, first sample index, sample count) for every shard."""
    plan = []
    for split, n in split_sizes(cfg).items():
        for shard_index, start in enumerate(range(0, n, cfg.samples_per_shard)):
            plan.append((split, shard_index, start, min(cfg.samples_per_shard, n - start)))
    return plan


def _object_description(obj: SceneObject) -> str:
    return f"{obj.size} {obj.pattern} {obj.colour} {obj.shape}"


def description(scene: Scene, image_size: int) -> str:
    """What every caption of the scene says, in one canonical string: two scenes with the same
    description are described equally well by each other's captions (semantic twins)."""
    objs = scene.objects
    if len(objs) == 1:
        return f"{_object_description(objs[0])} | {region(objs[0], image_size)}"
    a, b, relation = objs[0], objs[1], scene.relation
    if relation in ("right", "below"):  # "A right of B" says the same as "B left of A"
        a, b, relation = b, a, INVERSE[relation]
    rest = sorted(_object_description(o) for o in objs[2:])
    return " ; ".join([f"{_object_description(a)} {relation} {_object_description(b)}", *rest])


def shard_records(cfg: CorpusConfig, split: str, shard_index: int, start: int, count: int) -> list[tuple[dict, Scene]]:
    """The JSON record and scene of every sample of one shard, without rendering: a pure function
    of (cfg minus out_dir, split, shard_index). Test scenes never repeat a description (earlier test
    shards are replayed, without rendering, to know theirs); web scenes never take one of the test split."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, SPLIT_CODES[split], shard_index]))
    taken = set(test_descriptions(cfg, None if split == "web" else shard_index)) if split in ("test", "web") else set()
    unique = split in ("test", "web")
    records: list[tuple[dict, Scene]] = []
    previous: tuple[str, Scene] | None = None
    for index in range(start, start + count):
        key = sample_key(split, index)
        scene, source, change = None, None, None
        if previous is not None and rng.random() < cfg.near_duplicate_fraction:
            mutated = mutate(rng, previous[1], cfg.image_size, cfg.zipf)
            if mutated is not None and not (unique and description(mutated[0], cfg.image_size) in taken):
                (scene, change), source = mutated, previous[0]
        while scene is None:
            scene = random_scene(rng, cfg.image_size, cfg.zipf)
            if unique and description(scene, cfg.image_size) in taken:
                scene = None
        if split == "test":
            taken.add(description(scene, cfg.image_size))
        captions = captions_for(rng, scene, cfg.image_size, cfg.min_captions, cfg.max_captions)
        record = {"key": key, "captions": captions, "scene": scene.to_dict(), "near_duplicate_of": source, "change": change}
        records.append((record, scene))
        previous = (key, scene)
    return records


def test_descriptions(cfg: CorpusConfig, before_shard: int | None = None) -> frozenset[str]:
    """Descriptions of the target test scenes in shards [0, before_shard) (all of them by default):
    what later test shards and the web corpus must not repeat."""
    n_shards = sum(1 for split, *_ in shard_plan(cfg) if split == "test")
    return _test_descriptions(json.dumps(dataclasses.asdict(cfg), sort_keys=True),
                              n_shards if before_shard is None else before_shard)


@functools.lru_cache(maxsize=64)
def _test_descriptions(cfg_json: str, before_shard: int) -> frozenset[str]:
    if before_shard <= 0:
        return frozenset()
    cfg = CorpusConfig(**json.loads(cfg_json))
    plan = [item for item in shard_plan(cfg) if item[0] == "test"]
    _, shard_index, start, count = plan[before_shard - 1]
    return _test_descriptions(cfg_json, before_shard - 1) | {
        description(scene, cfg.image_size) for _, scene in shard_records(cfg, "test", shard_index, start, count)
    }


# ---- the world stream: the demo teacher's pretraining data, rendered on the fly ----------------
class WorldStream:
    """`num_images` fresh scenes of the corpus's world, each a pure function of (cfg.seed, index),
    rendered when asked for (in the DataLoader workers) instead of written as tars: the demo teacher
    sees as many samples as its budget allows, each once, for no disk. As the web split, it holds no
    scene described like a target test scene; unlike it, it has no near-duplicate pairs (consecutive
    indices never meet in a shuffled batch, so pairs would only change the scene distribution).

    `images[i]` is the PIL image, `captions[i * C + j]` caption j of image i,
    so a TrainingData built on it trains through the students' own loop."""

    def __init__(self, cfg: CorpusConfig, num_images: int) -> None:
        self.cfg = cfg
        self.num_images = num_images
        # one caption per scene: a scene is seen once, and one caption drawn from the whole grammar has the
        # distribution of one drawn from several (C = 1 in the indexing below)
        self.captions_per_image = 1
        self._taken: frozenset[str] | None = None

    @functools.lru_cache(maxsize=2048)  # an image and its caption are asked for separately
    def sample(self, index: int) -> tuple[Scene, tuple[str, ...]]:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        cfg = self.cfg
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, SPLIT_CODES["world"], index]))
        if self._taken is None:
            self._taken = test_descriptions(cfg)
        while True:
            scene = random_scene(rng, cfg.image_size, cfg.zipf)
            if description(scene, cfg.image_size) not in self._taken:
                break
        count = self.captions_per_image
        return scene, tuple(captions_for(rng, scene, cfg.image_size, count, count))

    def image(self, index: int) -> Image.Image:
        return render(self.sample(index)[0], self.cfg.image_size)

    def caption(self, text_id: int) -> str:
        image_id, j = divmod(int(text_id), self.captions_per_image)
        return self.sample(image_id)[1][j]


class _WorldItems:
    """A read-only sequence view of one kind of WorldStream item."""

    def __init__(self, stream: WorldStream, kind: str) -> None:
        self.stream, self.kind = stream, kind

    def __len__(self) -> int:
        n = self.stream.num_images
        return n if self.kind == "image" else n * self.stream.captions_per_image

    def __getitem__(self, index: int):
        return self.stream.image(int(index)) if self.kind == "image" else self.stream.caption(int(index))


def world_sequences(cfg: CorpusConfig, num_images: int) -> tuple[_WorldItems, _WorldItems, np.ndarray]:
    """(images, captions, text_to_image) of a WorldStream: what a TrainingData needs."""
    validate_config(cfg)
    stream = WorldStream(cfg, num_images)
    text_to_image = np.repeat(np.arange(num_images, dtype=np.int64), stream.captions_per_image)
    return _WorldItems(stream, "image"), _WorldItems(stream, "caption"), text_to_image


WORLD_FINGERPRINT_SCENES = 32


@functools.lru_cache(maxsize=1)
def world_fingerprint() -> str:
    """sha256 over the first scenes of one fixed world stream, rendered and captioned: it changes with any
    change to the vocabulary, grammar or renderer (not with a corpus's seed or size), so a generator edited
    without bumping WORLD_VERSION is caught."""
    fixed = CorpusConfig(seed=0, image_size=64, zipf=1.2, test_images=0)
    stream = WorldStream(fixed, WORLD_FINGERPRINT_SCENES)
    digest = hashlib.sha256()
    for index in range(WORLD_FINGERPRINT_SCENES):
        digest.update(encode(stream.image(index), "png"))
        digest.update(stream.caption(index).encode())
    return digest.hexdigest()


def world_record(cfg: CorpusConfig) -> dict[str, Any]:
    """Which world a corpus or teacher belongs to: recorded in the manifest and the demo teacher's card."""
    return {"name": WORLD_NAME, "version": WORLD_VERSION, "image_size": cfg.image_size, "zipf": cfg.zipf,
            "fingerprint": world_fingerprint()}


def build_shard(cfg: CorpusConfig, split: str, shard_index: int, start: int, count: int) -> bytes:
    """The bytes of one tar shard; a pure function of (cfg minus out_dir, split, shard_index)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for record, scene in shard_records(cfg, split, shard_index, start, count):
            key = record["key"]
            _tar_member(archive, f"{key}.{cfg.image_format}", encode(render(scene, cfg.image_size), cfg.image_format))
            _tar_member(archive, f"{key}.txt", ("\n".join(record["captions"]) + "\n").encode())
            _tar_member(archive, f"{key}.json", json.dumps(record, sort_keys=True).encode())
    return buf.getvalue()


def write_shard(cfg: CorpusConfig, split: str, shard_index: int, start: int, count: int) -> int:
    """Build one shard and write it atomically into cfg.out_dir; returns its sample count."""
    atomic_write_bytes(build_shard(cfg, split, shard_index, start, count), Path(cfg.out_dir) / shard_name(split, shard_index))
    return count


# ---- the corpus --------------------------------------------------------------------------------
def validate_config(cfg: CorpusConfig) -> None:
    """What relates several keys (each key's own range is checked by the config itself)."""
    problems = []
    if sum(split_sizes(cfg).values()) <= 0:
        problems.append("corpus: train_images + val_images + test_images + web_images must be > 0")
    if not cfg.min_captions <= cfg.max_captions <= MAX_CAPTIONS:
        problems.append(
            f"corpus: need 1 <= min_captions <= max_captions <= {MAX_CAPTIONS}, "
            f"got {cfg.min_captions} and {cfg.max_captions}"
        )
    if problems:
        raise ConfigError("; ".join(problems))


def config_hash(cfg: CorpusConfig) -> str:
    """sha256 of everything that determines the shards' bytes (not out_dir)."""
    data = dataclasses.asdict(cfg)
    for not_content in NOT_CONTENT_FIELDS:
        data.pop(not_content)
    data["generator_version"] = GENERATOR_VERSION
    data["world_version"] = WORLD_VERSION
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _shard_pattern(split: str, n_shards: int) -> str:
    if n_shards == 1:
        return shard_name(split, 0)
    return f"{split}-{{{0:06d}..{n_shards - 1:06d}}}.tar"


def manifest_comment(cfg: CorpusConfig) -> str:
    return (
        "Synthetic captioned-scenes corpus, written by `dsmd corpus` (pipeline/corpus/synthetic.py); regenerate, do not edit.\n"
        f"corpus config sha256: {config_hash(cfg)}\n"
        "Shard paths are relative to this file's directory."
    )


def manifest_data(cfg: CorpusConfig, shard_prefix: str = "") -> dict[str, Any]:
    """The manifest `dsmd corpus` writes for `cfg`; `shard_prefix` is prepended to shard paths."""
    n_shards: dict[str, int] = {}
    for split, _, _, _ in shard_plan(cfg):
        n_shards[split] = n_shards.get(split, 0) + 1
    splits = {
        split: {"shards": shard_prefix + _shard_pattern(split, n_shards[split]), "num_samples": n}
        for split, n in split_sizes(cfg).items()
        if n > 0
    }
    return {
        "name": CORPUS_NAME,
        "world": world_record(cfg),
        "description": (
            f"{cfg.image_size} px {cfg.image_format} scenes of 1-3 coloured, patterned shapes (Zipf {cfg.zipf}), "
            f"{cfg.min_captions}-{cfg.max_captions} captions each, "
            f"{cfg.near_duplicate_fraction:.0%} near-duplicates, seed {cfg.seed}"
        ),
        "fields": {"image": [cfg.image_format], "captions": {"source": "txt"}},
        "splits": splits,
        **({"classification": {task: {"root": f"{shard_prefix}{ZEROSHOT_DIR}/{task}"} for task in ZEROSHOT_TASKS}}
           if split_sizes(cfg).get("test") else {}),
    }


_SHARD_FILE_RE = re.compile(r"^(train|val|test|web)-\d{6}\.tar$")


def generate_corpus(cfg: CorpusConfig) -> Path:
    """Write the corpus's shards and manifest into cfg.out_dir; returns the manifest path.

    Resumable: shards already written for the same config (recorded hash in corpus_config.json)
    are kept; with a different or unknown config every shard is removed and regenerated.
    """
    validate_config(cfg)
    out_dir = prepare_output_dir(cfg.out_dir)
    digest = config_hash(cfg)
    record_path = out_dir / CONFIG_RECORD
    manifest_path = out_dir / MANIFEST_NAME

    recorded = None
    if record_path.exists():
        try:
            recorded = json.loads(record_path.read_text()).get("config_sha256")
        except (ValueError, AttributeError):
            recorded = None
    if recorded != digest:
        # Shards of another (or unknown) config must not be mixed with new ones: start clean,
        # and record the new config first so that an interrupted run can resume.
        stale = [p for p in out_dir.iterdir() if _SHARD_FILE_RE.match(p.name)]
        if stale:
            log.info("corpus config changed: removing %d shard(s) in %s", len(stale), out_dir)
        for p in stale + ([manifest_path] if manifest_path.exists() else []):
            p.unlink()
        config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_CONTENT_FIELDS}
        atomic_write_json({"config_sha256": digest, "generator_version": GENERATOR_VERSION, "config": config}, record_path)

    plan = shard_plan(cfg)
    wanted = {shard_name(split, i) for split, i, _, _ in plan}
    for p in out_dir.iterdir():  # shards beyond the plan (cannot happen with a matching hash, but be safe)
        if _SHARD_FILE_RE.match(p.name) and p.name not in wanted:
            p.unlink()
    todo = [item for item in plan if not (out_dir / shard_name(item[0], item[1])).exists()]
    if len(todo) < len(plan):
        log.info("corpus: %d of %d shard(s) already written for this config", len(plan) - len(todo), len(plan))
    workers = min(cfg.workers or os.cpu_count() or 1, len(todo))
    with progress_bar(sum(item[3] for item in todo), "corpus", "img") as progress:
        if workers <= 1:
            for item in todo:
                progress.update(write_shard(cfg, *item))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for done in as_completed([pool.submit(write_shard, cfg, *item) for item in todo]):
                    progress.update(done.result())
    if split_sizes(cfg).get("test"):
        write_zeroshot_tasks(cfg)
    write_manifest(manifest_data(cfg), manifest_path, comment=manifest_comment(cfg))
    report = corpus_report(cfg)
    atomic_write_json(report, out_dir / REPORT_NAME)
    log.info(
        "corpus: %.1f%% of test captions describe another test image too; %.1f%% of test scenes hold an object "
        "seen < %d times in train (web: %s times as many)", 100 * report["test_ambiguous_caption_fraction"],
        100 * report["test_tail_scene_fraction"], TAIL_COUNT, report.get("web_to_train_ratio"),
    )
    return manifest_path


# ---- zero-shot classification tasks ------------------------------------------------------------
# Built from the test split's scene records, in CLIP_benchmark's WebDataset layout, so the embedded
# run reports zero-shot accuracy as ImageNet users do. task -> (class names, templates, label of a scene
# or None to leave the scene out). Templates avoid "a"/"an", which would give the class name away.
ZEROSHOT_DIR = names.CORPUS_ZEROSHOT_DIR
COUNT_NAMES = ("a single shape", "two shapes", "three shapes")
ZEROSHOT_TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...], Any]] = {
    "shape": (tuple(SHAPES), ("one {c}", "a picture of one {c}", "there is one {c} in the picture", "{c}"),
              lambda scene: scene.objects[0].shape if len(scene.objects) == 1 else None),
    "colour": (tuple(COLOURS), ("one {c} shape", "a picture of something {c}", "{c}"),
               lambda scene: scene.objects[0].colour if len(scene.objects) == 1 else None),
    "pattern": (tuple(PATTERNS), ("one {c} shape", "a picture of something {c}", "{c}"),
                lambda scene: scene.objects[0].pattern if len(scene.objects) == 1 else None),
    "count": (COUNT_NAMES, ("{c}", "a picture of {c}", "an image with {c}"),
              lambda scene: COUNT_NAMES[len(scene.objects) - 1]),
}


def write_zeroshot_tasks(cfg: CorpusConfig) -> None:
    """`zeroshot/<task>/` for every task: classnames.txt, zeroshot_classification_templates.txt and
    test/0.tar ({key}.<image format> + {key}.cls), the test images relabelled."""
    out_dir = Path(cfg.out_dir)
    images: list[tuple[str, bytes, Scene]] = []
    for split, shard_index, _, _ in shard_plan(cfg):
        if split != "test":
            continue
        with tarfile.open(out_dir / shard_name(split, shard_index)) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".json"):
                    record = json.loads(archive.extractfile(member).read())
                    data = archive.extractfile(f"{record['key']}.{cfg.image_format}").read()
                    images.append((record["key"], data, Scene.from_dict(record["scene"])))
    for task, (classnames, templates, label_of) in ZEROSHOT_TASKS.items():
        root = out_dir / ZEROSHOT_DIR / task
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for key, data, scene in images:
                label = label_of(scene)
                if label is not None:
                    _tar_member(archive, f"{key}.{cfg.image_format}", data)
                    _tar_member(archive, f"{key}.cls", str(classnames.index(label)).encode())
        atomic_write_bytes(buf.getvalue(), root / "test" / "0.tar")
        atomic_write_text("\n".join(classnames) + "\n", root / CLASSNAMES_FILE)
        atomic_write_text("\n".join(templates) + "\n", root / TEMPLATES_FILE)


TAIL_COUNT = 5  # an object kind (size, pattern, colour, shape) seen fewer times than this in train is "tail"


def read_records(path: Path) -> list[dict]:
    """The JSON records of one written shard."""
    with tarfile.open(path) as archive:
        return [json.loads(archive.extractfile(m).read()) for m in archive.getmembers() if m.name.endswith(".json")]


def corpus_report(cfg: CorpusConfig) -> dict[str, Any]:
    """Measured from the written scene records: per-split frequencies of every colour, shape and
    pattern; the share of test captions that describe another test scene equally well (semantic
    twins); the share of test scenes with a tail object kind; test descriptions found in the web split."""
    out_dir = Path(cfg.out_dir)
    records: dict[str, list[dict]] = {}
    for split, shard_index, _, _ in shard_plan(cfg):
        records.setdefault(split, []).extend(read_records(out_dir / shard_name(split, shard_index)))
    scenes = {split: [Scene.from_dict(r["scene"]) for r in rs] for split, rs in records.items()}
    report: dict[str, Any] = {"config_sha256": config_hash(cfg), "splits": {}}
    for split, items in scenes.items():
        objects = [o for scene in items for o in scene.objects]
        report["splits"][split] = {
            "images": len(items),
            **{attr: dict(collections.Counter(getattr(o, attr) for o in objects).most_common())
               for attr in ("colour", "shape", "pattern")},
        }
    if "test" in scenes:
        descriptions = [description(s, cfg.image_size) for s in scenes["test"]]
        shared = collections.Counter(descriptions)
        captions = [len(r["captions"]) for r in records["test"]]
        ambiguous = sum(n for n, d in zip(captions, descriptions) if shared[d] > 1)
        report["test_ambiguous_caption_fraction"] = ambiguous / max(1, sum(captions))
        train_kinds = collections.Counter(_object_description(o) for s in scenes.get("train", []) for o in s.objects)
        tail = [any(train_kinds[_object_description(o)] < TAIL_COUNT for o in s.objects) for s in scenes["test"]]
        report["test_tail_scene_fraction"] = sum(tail) / max(1, len(tail))
        if "web" in scenes:
            test_set = set(descriptions)
            report["web_scenes_with_a_test_description"] = sum(description(s, cfg.image_size) in test_set for s in scenes["web"])
    if scenes.get("train") and scenes.get("web"):
        report["web_to_train_ratio"] = len(scenes["web"]) / len(scenes["train"])
    report.setdefault("test_ambiguous_caption_fraction", 0.0)
    report.setdefault("test_tail_scene_fraction", 0.0)
    return report
