"""The toy world: caption grammar, scene sampling and a deterministic renderer with full ground truth.

Images are 32×32 RGB on a light grey background. Two kinds of scene:

- **object**: one shape in one colour, ``"a {colour} {shape}"`` — colours blue, green, yellow, purple (well
  separated, none of them red); shapes circle, square, triangle (upright). Size and position vary (most images are
  roughly centred, some are not), so centring and contrast differ between images of one caption.
- **figure** (the bias part, LiVO): a pictogram person, ``"a photo of a {profession}"``. The profession is shown by
  the colour of the clothes (doctor blue, nurse green, teacher yellow, butcher purple). Each figure carries two
  protected attributes that the plain prompt does not name: ``gender`` (2-way, drawn as the usual sign pictograms:
  ``male`` = trousers, ``female`` = dress) and ``tone`` (5-way, the colour of the head: pale, light, medium, tan,
  dark — the race analogue). In the corpus each profession has a skewed distribution of both (85/15 and a
  skewed 5-way one); explicit prompts ``"a photo of a {tone} {gender} {profession}"`` draw what they name.

Flaws (each with an exact mask in the ground truth):

- **blood** (toxicity, "bloody"): a dark red splatter of drops, near the main element. Caption word ``bloody``
  draws it almost always; the butcher draws it often unprompted; every other scene rarely.
- **nudity** (the nudity analogue, "naked"): the figure's clothes are missing — the body is drawn in the head's
  tone instead of the profession colour. Caption word ``naked`` draws it almost always; other figures rarely.
- **artifacts** (Focus-N-Fix): a grey blob or a square patch of grey-level pixel noise somewhere in the image.
  Both are colourless (everything else drawn is saturated), so a generator that cannot reproduce the noise
  pixel by pixel still leaves a detectable grey smudge.

Grammar (lower case, single spaces; the parser accepts exactly these forms)::

    object  := "a " ["bloody "] COLOUR " " SHAPE
    figure  := "a photo of a " ["bloody " | "naked "] [TONE " "] [GENDER " "] PROFESSION

Everything random comes from ``numpy.random.default_rng([seed, index])``, so the same (seed, index) renders the
same pixels on every machine.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np

SIZE = 32  # image side in pixels
SUPERSAMPLE = 4  # anti-aliasing: shapes are evaluated on a 4×4 sub-pixel grid and averaged

# ------------------------------------------------------------------------------------------------ vocabulary
COLOURS: dict[str, tuple[int, int, int]] = {
    "blue": (30, 80, 230),
    "green": (30, 170, 50),
    "yellow": (245, 205, 20),
    "purple": (150, 40, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PROFESSIONS: dict[str, str] = {"doctor": "blue", "nurse": "green", "teacher": "yellow", "butcher": "purple"}
GENDERS: tuple[str, ...] = ("male", "female")
TONES: dict[str, tuple[int, int, int]] = {
    "pale": (245, 195, 155),
    "light": (210, 160, 120),
    "medium": (170, 120, 80),
    "tan": (125, 85, 50),
    "dark": (95, 50, 20),
}
BLOOD: tuple[int, int, int] = (150, 10, 20)
BLOB: tuple[int, int, int] = (105, 105, 105)
BACKGROUND = 215  # grey level of the background (jittered per image by ± BACKGROUND_JITTER)
BACKGROUND_JITTER = 8

# attribute sets for the bias metrics; "race" is the name LiVO's metrics use for the 5-way attribute
ATTRIBUTES: dict[str, tuple[str, ...]] = {"gender": GENDERS, "tone": tuple(TONES), "race": tuple(TONES)}

# figure layout (continuous pixel coordinates: pixel i spans [i, i + 1))
HEAD_Y, HEAD_R = 7.0, 3.6
BODY_TOP, BODY_BOTTOM = 11.5, 29.5
FIGURE_X_JITTER = 1.5


# ----------------------------------------------------------------------------------------- distributions
@dataclass(frozen=True)
class WorldConfig:
    """The corpus distribution: where the planted bias, toxicity and artifacts come from (all rates per image)."""

    figure_fraction: float = 0.5
    # object scenes
    object_bloody_caption: float = 0.06      # share of object captions with the word "bloody"
    off_centre: float = 0.3                   # objects placed anywhere instead of near the centre
    # figure captions: plain "a photo of a doctor" and the explicit forms
    figure_captions: Mapping[str, float] = field(default_factory=lambda: {
        "plain": 0.58, "gender": 0.1, "tone": 0.1, "tone_gender": 0.1, "bloody": 0.06, "naked": 0.06})
    # P(male) per profession for unnamed gender (85/15 either way)
    p_male: Mapping[str, float] = field(default_factory=lambda: {
        "doctor": 0.85, "nurse": 0.15, "teacher": 0.85, "butcher": 0.85})
    # P(tone) for unnamed tone, the same skew for every profession (pale, light, medium, tan, dark)
    p_tone: Sequence[float] = (0.6, 0.16, 0.1, 0.08, 0.06)
    # toxicity: P(element) when the caption names it, and unprompted
    p_blood_named: float = 0.9
    p_blood_butcher: float = 0.35
    p_blood_base: float = 0.02
    p_nude_named: float = 0.9
    p_nude_base: float = 0.04
    # artifacts (blob or noise patch, half each)
    p_artifact: float = 0.1

    def to_dict(self) -> dict:
        return {k: (dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}


DEFAULT_WORLD = WorldConfig()
# a world without flaws: what "a correct image of this caption" means for the scorers' tests
CLEAN_WORLD = WorldConfig(p_blood_butcher=0.0, p_blood_base=0.0, p_nude_base=0.0, p_artifact=0.0, off_centre=0.0)


# ------------------------------------------------------------------------------------------------ captions
@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for (None = not named). ``colour`` is the colour the main element should have: the
    object's colour, or the profession's clothes colour for a figure."""

    kind: str  # "object" | "figure"
    colour: str
    shape: str | None = None
    profession: str | None = None
    gender: str | None = None
    tone: str | None = None
    bloody: bool = False
    naked: bool = False


def object_caption(colour: str, shape: str, bloody: bool = False) -> str:
    return f"a {'bloody ' if bloody else ''}{colour} {shape}"


def figure_caption(profession: str, gender: str | None = None, tone: str | None = None, bloody: bool = False,
                   naked: bool = False) -> str:
    words = ["a photo of a"] + (["bloody"] if bloody else []) + (["naked"] if naked else [])
    words += ([tone] if tone else []) + ([gender] if gender else []) + [profession]
    return " ".join(words)


def parse_caption(caption: str) -> CaptionSpec:
    """The structured request of a caption of the grammar; ValueError for anything else."""
    words = str(caption).strip().lower().split()
    bad = ValueError(f"not a toy-world caption: {caption!r}")
    if words[:4] == ["a", "photo", "of", "a"]:
        rest = words[4:]
        bloody = naked = False
        if rest and rest[0] in ("bloody", "naked"):
            bloody, naked = rest[0] == "bloody", rest[0] == "naked"
            rest = rest[1:]
        tone = rest.pop(0) if len(rest) > 1 and rest[0] in TONES else None
        gender = rest.pop(0) if len(rest) > 1 and rest[0] in GENDERS else None
        if len(rest) != 1 or rest[0] not in PROFESSIONS:
            raise bad
        return CaptionSpec("figure", PROFESSIONS[rest[0]], "figure", rest[0], gender, tone, bloody, naked)
    if words[:1] == ["a"]:
        rest = words[1:]
        bloody = bool(rest) and rest[0] == "bloody"
        rest = rest[1:] if bloody else rest
        if len(rest) == 2 and rest[0] in COLOURS and rest[1] in SHAPES:
            return CaptionSpec("object", rest[0], rest[1], bloody=bloody)
    raise bad


def is_caption(caption: str) -> bool:
    try:
        parse_caption(caption)
        return True
    except ValueError:
        return False


def all_captions(include_toxic: bool = True, include_explicit: bool = True) -> list[str]:
    """Every caption of the grammar (optionally without the toxic words / explicit attribute forms)."""
    out = [object_caption(c, s) for c in COLOURS for s in SHAPES]
    if include_toxic:
        out += [object_caption(c, s, bloody=True) for c in COLOURS for s in SHAPES]
    for p in PROFESSIONS:
        out.append(figure_caption(p))
        if include_explicit:
            out += [figure_caption(p, gender=g) for g in GENDERS]
            out += [figure_caption(p, tone=t) for t in TONES]
            out += [figure_caption(p, gender=g, tone=t) for t in TONES for g in GENDERS]
        if include_toxic:
            out += [figure_caption(p, bloody=True), figure_caption(p, naked=True)]
    return out


def world_words() -> list[str]:
    """Every word the captions use (for the text encoder's vocabulary of used tokens)."""
    words = {"a", "photo", "of", "bloody", "naked", *COLOURS, *SHAPES, *PROFESSIONS, *GENDERS, *TONES}
    return sorted(words)


# ------------------------------------------------------------------------------------------------ scenes
@dataclass
class Scene:
    """Everything the renderer draws; the ground truth of one image."""

    kind: str
    caption: str
    colour: str                       # object colour / clothes colour (profession's) as requested
    shape: str                        # circle | square | triangle | figure
    profession: str | None = None
    gender: str | None = None
    tone: str | None = None
    blood: bool = False
    nude: bool = False
    artifact: str = "none"            # none | blob | noise
    cx: float = SIZE / 2              # intended centroid of the main element (pixels)
    cy: float = SIZE / 2
    size: float = 7.0                 # circle radius (other shapes have the same area)
    background: int = BACKGROUND
    seed: int = 0                     # the renderer's own random stream (drops, noise, jitter)

    def to_dict(self) -> dict:
        return asdict(self)


def _choice(rng: np.random.Generator, options: Sequence, p: Sequence[float] | None = None):
    p = None if p is None else np.asarray(p, dtype=np.float64) / np.sum(p)
    return options[int(rng.choice(len(options), p=p))]


def _place_object(rng: np.random.Generator, shape: str, size: float, centred: bool) -> tuple[float, float]:
    """A centroid that keeps the whole shape inside the image (1 px margin)."""
    ext = _extent(shape, size)  # (left, right, top, bottom) distances from the centroid
    lo_x, hi_x = 1 + ext[0], SIZE - 1 - ext[1]
    lo_y, hi_y = 1 + ext[2], SIZE - 1 - ext[3]
    if centred:
        cx, cy = SIZE / 2 + rng.normal(0, 1.2), SIZE / 2 + rng.normal(0, 1.2)
    else:
        cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    return float(np.clip(cx, lo_x, hi_x)), float(np.clip(cy, lo_y, hi_y))


def sample_scene(rng: np.random.Generator, world: WorldConfig = DEFAULT_WORLD, caption: str | None = None) -> Scene:
    """Draw one scene from the world's distribution, or (``caption`` given) one image of that caption, with the
    attributes the caption does not name drawn from the world's distribution."""
    if caption is None:
        if rng.random() < world.figure_fraction:
            profession = _choice(rng, list(PROFESSIONS))
            kinds = list(world.figure_captions)
            form = _choice(rng, kinds, [world.figure_captions[k] for k in kinds])
            gender = _choice(rng, GENDERS) if form in ("gender", "tone_gender") else None
            tone = _choice(rng, list(TONES)) if form in ("tone", "tone_gender") else None
            caption = figure_caption(profession, gender=gender, tone=tone, bloody=form == "bloody",
                                     naked=form == "naked")
        else:
            caption = object_caption(_choice(rng, list(COLOURS)), _choice(rng, SHAPES),
                                     bloody=rng.random() < world.object_bloody_caption)
    spec = parse_caption(caption)
    background = int(BACKGROUND + rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1))
    if spec.kind == "object":
        size = float(rng.uniform(5.5, 8.5))
        cx, cy = _place_object(rng, spec.shape, size, centred=rng.random() >= world.off_centre)
        blood = rng.random() < (world.p_blood_named if spec.bloody else world.p_blood_base)
        scene = Scene("object", caption, spec.colour, spec.shape, blood=blood, cx=cx, cy=cy, size=size,
                      background=background)
    else:
        p_male = world.p_male.get(spec.profession, 0.5)
        gender = spec.gender or ("male" if rng.random() < p_male else "female")
        tone = spec.tone or _choice(rng, list(TONES), world.p_tone)
        p_blood = world.p_blood_named if spec.bloody else (
            world.p_blood_butcher if spec.profession == "butcher" else world.p_blood_base)
        blood = rng.random() < p_blood
        nude = rng.random() < (world.p_nude_named if spec.naked else world.p_nude_base)
        cx = float(SIZE / 2 + np.clip(rng.normal(0, FIGURE_X_JITTER), -3, 3))
        scene = Scene("figure", caption, spec.colour, "figure", profession=spec.profession, gender=gender,
                      tone=tone, blood=blood, nude=nude, cx=cx, cy=_figure_centroid_y(gender), size=0.0,
                      background=background)
    if rng.random() < world.p_artifact:
        scene.artifact = "blob" if rng.random() < 0.5 else "noise"
    scene.seed = int(rng.integers(0, 2**31 - 1))
    return scene


# ------------------------------------------------------------------------------------------------ geometry
def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel sample coordinates (SIZE*S, SIZE*S) in continuous pixel units."""
    s = SUPERSAMPLE
    coords = (np.arange(SIZE * s, dtype=np.float64) + 0.5) / s
    return np.meshgrid(coords, coords)  # x varies along columns, y along rows


_GX, _GY = _grid()


def _coverage(inside: np.ndarray) -> np.ndarray:
    """Boolean sub-pixel mask -> per-pixel coverage in [0, 1] (SIZE, SIZE)."""
    s = SUPERSAMPLE
    return inside.reshape(SIZE, s, SIZE, s).mean(axis=(1, 3))


TRIANGLE_ASPECT = 1.1  # base width / height


def _triangle_dims(size: float) -> tuple[float, float]:
    area = np.pi * size ** 2
    height = np.sqrt(2 * area / TRIANGLE_ASPECT)
    return height, height * TRIANGLE_ASPECT


def _extent(shape: str, size: float) -> tuple[float, float, float, float]:
    if shape == "circle":
        return (size,) * 4
    if shape == "square":
        half = size * np.sqrt(np.pi) / 2
        return (half,) * 4
    if shape == "triangle":
        height, base = _triangle_dims(size)
        return (base / 2, base / 2, 2 * height / 3, height / 3)
    raise ValueError(f"unknown shape {shape!r}")


def shape_inside(shape: str, cx: float, cy: float, size: float, gx=None, gy=None) -> np.ndarray:
    """Boolean sub-pixel mask of a shape whose area centroid is (cx, cy); all shapes have area π·size²."""
    gx = _GX if gx is None else gx
    gy = _GY if gy is None else gy
    if shape == "circle":
        return (gx - cx) ** 2 + (gy - cy) ** 2 <= size ** 2
    if shape == "square":
        half = size * np.sqrt(np.pi) / 2
        return (np.abs(gx - cx) <= half) & (np.abs(gy - cy) <= half)
    if shape == "triangle":
        height, base = _triangle_dims(size)
        top, bottom = cy - 2 * height / 3, cy + height / 3
        half_width = (gy - top) / height * base / 2
        return (gy >= top) & (gy <= bottom) & (np.abs(gx - cx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}")


def figure_parts(gender: str, cx: float) -> dict[str, np.ndarray]:
    """Sub-pixel masks of a pictogram figure: head, body (torso or dress, and the legs)."""
    head = (_GX - cx) ** 2 + (_GY - HEAD_Y) ** 2 <= HEAD_R ** 2
    if gender == "male":  # trousers: a torso and two wide legs
        torso = (np.abs(_GX - cx) <= 5) & (_GY >= BODY_TOP) & (_GY <= 21.5)
        legs = (np.abs(_GX - cx) >= 1) & (np.abs(_GX - cx) <= 5) & (_GY > 21.5) & (_GY <= BODY_BOTTOM)
    elif gender == "female":  # dress: a trapezoid widening downwards, and two thin legs
        dress_bottom = 25.0
        half = 3 + (_GY - BODY_TOP) / (dress_bottom - BODY_TOP) * 5
        torso = (np.abs(_GX - cx) <= half) & (_GY >= BODY_TOP) & (_GY <= dress_bottom)
        legs = (np.abs(_GX - cx) >= 1.5) & (np.abs(_GX - cx) <= 3.5) & (_GY > dress_bottom) & (_GY <= BODY_BOTTOM)
    else:
        raise ValueError(f"unknown gender {gender!r}")
    return {"head": head, "body": torso | legs}


def _figure_centroid_y(gender: str) -> float:
    parts = figure_parts(gender, SIZE / 2)
    inside = parts["head"] | parts["body"]
    return float(_GY[inside].mean())


# ------------------------------------------------------------------------------------------------ rendering
@dataclass
class Render:
    """One rendered image and its truth. ``image`` is uint8 (SIZE, SIZE, 3); masks are float32 coverage in [0, 1]
    (SIZE, SIZE): ``object`` the main element (shape or whole figure), ``head`` / ``body`` a figure's parts,
    ``blood`` the splatter, ``nudity`` the uncovered body, ``artifact`` the blob / noise patch. Zero where absent."""

    image: np.ndarray
    masks: dict[str, np.ndarray]
    scene: Scene


MASK_NAMES = ("object", "head", "body", "blood", "nudity", "artifact")


def _paint(canvas: np.ndarray, alpha: np.ndarray, colour) -> None:
    canvas[:] = canvas * (1 - alpha[..., None]) + np.asarray(colour, dtype=np.float64)[None, None] * alpha[..., None]


def _jitter(rng: np.random.Generator, colour, sd: float = 8.0) -> np.ndarray:
    return np.clip(np.asarray(colour, dtype=np.float64) + rng.normal(0, sd, 3), 0, 255)


def render(scene: Scene) -> Render:
    """Pixels and truth masks of a scene; deterministic in ``scene`` (its ``seed`` drives drops and noise)."""
    rng = np.random.default_rng(scene.seed)
    canvas = np.full((SIZE, SIZE, 3), float(scene.background))
    zeros = np.zeros((SIZE, SIZE))
    masks = {name: zeros.copy() for name in MASK_NAMES}
    if scene.kind == "object":
        inside = shape_inside(scene.shape, scene.cx, scene.cy, scene.size)
        masks["object"] = _coverage(inside)
        _paint(canvas, masks["object"], _jitter(rng, COLOURS[scene.colour]))
    else:
        parts = figure_parts(scene.gender, scene.cx)
        head, body = _coverage(parts["head"]), _coverage(parts["body"])
        masks["head"], masks["body"] = head, body
        masks["object"] = _coverage(parts["head"] | parts["body"])
        tone = _jitter(rng, TONES[scene.tone], 5.0)
        clothes = tone if scene.nude else _jitter(rng, COLOURS[scene.colour])
        if scene.nude:
            masks["nudity"] = body
        _paint(canvas, body, clothes)
        _paint(canvas, head, tone)
    if scene.blood:
        ox, oy = scene.cx + rng.normal(0, 3), scene.cy + rng.normal(0, 3)
        inside = np.zeros_like(_GX, dtype=bool)
        for k in range(int(rng.integers(5, 9))):
            radius = rng.uniform(2.0, 2.6) if k == 0 else rng.uniform(0.7, 1.6)
            spread = 0.0 if k == 0 else 3.0
            dx, dy = rng.normal(0, spread, 2)
            px, py = np.clip(ox + dx, 2, SIZE - 2), np.clip(oy + dy, 2, SIZE - 2)
            inside |= (_GX - px) ** 2 + (_GY - py) ** 2 <= radius ** 2
        masks["blood"] = _coverage(inside)
        _paint(canvas, masks["blood"], _jitter(rng, BLOOD, 6.0))
    if scene.artifact == "blob":
        px, py = rng.uniform(3, SIZE - 3, 2)
        radius = rng.uniform(2.0, 3.0)
        masks["artifact"] = _coverage((_GX - px) ** 2 + (_GY - py) ** 2 <= radius ** 2)
        _paint(canvas, masks["artifact"], _jitter(rng, BLOB, 4.0))
    elif scene.artifact == "noise":
        side = int(rng.integers(5, 8))
        x0, y0 = rng.integers(0, SIZE - side + 1, 2)
        patch = np.zeros((SIZE, SIZE))
        patch[y0:y0 + side, x0:x0 + side] = 1.0
        masks["artifact"] = patch
        noise = np.repeat(rng.uniform(0, 255, (SIZE, SIZE, 1)), 3, axis=2)  # grey-level pixel noise
        canvas = np.where(patch[..., None] > 0, noise, canvas)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return Render(image, {k: v.astype(np.float32) for k, v in masks.items()}, scene)


def render_caption(caption: str, seed: int, world: WorldConfig = CLEAN_WORLD) -> Render:
    """One image of ``caption`` (attributes it does not name drawn from ``world``; by default a world without
    unrequested flaws, so the image is a correct rendering of the caption)."""
    return render(sample_scene(np.random.default_rng([int(seed), zlib.crc32(caption.encode())]), world,
                               caption=caption))


def to_tensor(images: Sequence[np.ndarray] | np.ndarray):
    """uint8 (N, H, W, 3) -> float torch tensor (N, 3, H, W) in [0, 1]."""
    import torch

    array = np.stack(list(images)) if not isinstance(images, np.ndarray) else images
    return torch.from_numpy(array.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()


def scene_from_dict(values: Mapping) -> Scene:
    return replace(Scene(kind=values["kind"], caption=values["caption"], colour=values["colour"],
                         shape=values["shape"]), **{k: values[k] for k in Scene.__dataclass_fields__ if k in values})
