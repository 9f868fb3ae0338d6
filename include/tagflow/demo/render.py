"""Rendering one synthetic graphic design: the 50 visual-attribute labels and the drawing that makes each true.

A label is 1 exactly when its attribute is drawn: the background style, tone and tint, the kinds and colour
families of the shapes, the layout, text, and decorations (see `LABEL_NAMES`). Attributes are chosen to stay visible
after a resize to 96 px and JPEG compression: colour labels name the saturated colours of the shapes, while
backgrounds, text and decorations use only tints of the background hue. Images are 224-320 px on each side (60 %
not square, up to 1.2:1), JPEG (quality 90) with about 5 % PNG; `exotic=True` adds a few unusual encodings.
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image, ImageDraw, ImageFont

BACKGROUNDS = ("solid", "linear_gradient", "radial_gradient", "stripes", "dots", "checker", "noise")
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "ring", "diamond", "cross", "heart", "arrow")
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "white", "black")
LAYOUTS = ("single", "few", "many", "grid")
DECORATIONS = ("has_border", "has_diagonal_lines", "has_wave", "has_corner_accents", "has_arc", "has_panel")

LABEL_NAMES: list[str] = [
    *(f"bg_{name}" for name in BACKGROUNDS),  # the background's style: exactly one
    "bg_dark",  # background value in the dark band (V <= 0.3); mid-tone backgrounds have neither tone label
    "bg_light",  # ... in the light band (V >= 0.8)
    "bg_warm",  # background tinted red-orange-yellow; neutral grey backgrounds have neither tint label
    "bg_cool",  # ... tinted cyan-blue
    *(f"shape_{name}" for name in SHAPES),  # at least one shape of this kind
    *(f"color_{name}" for name in COLORS),  # at least one shape of this colour family
    "palette_multicolor",  # shapes in two colour families
    *(f"layout_{name}" for name in LAYOUTS),  # one large shape / 2-4 medium / 8-14 small / a regular grid
    "style_outline",  # shapes drawn as outlines, not filled
    "style_shadow",  # shapes cast a drop shadow
    "has_text",  # a band of words at the top or bottom
    "text_large",  # ... in a large font
    "text_banner",  # ... on a solid band across the width
    "text_multiline",  # ... in two lines
    *DECORATIONS,  # frame at the edge, parallel diagonals, a wave line, corner triangles, a corner arc, a card
    "border_double",  # a second, inner frame
    "has_vignette",  # corners darkened
]
NUM_LABELS = len(LABEL_NAMES)
assert NUM_LABELS == 50, NUM_LABELS
_LABEL_INDEX = {name: i for i, name in enumerate(LABEL_NAMES)}

JPEG_QUALITY = 90
PNG_FRACTION = 0.05
EXOTIC_FRACTION = 0.05
# Saturated colour families of the shapes: hue range (degrees), saturation range, value range.
_FAMILY_HSV: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "red": ((-8, 6), (0.85, 1.0), (0.8, 0.95)),
    "orange": ((24, 34), (0.9, 1.0), (0.95, 1.0)),
    "yellow": ((52, 58), (0.85, 1.0), (0.95, 1.0)),
    "green": ((105, 135), (0.75, 0.95), (0.65, 0.85)),
    "cyan": ((180, 190), (0.75, 0.95), (0.85, 1.0)),
    "blue": ((218, 232), (0.8, 1.0), (0.85, 1.0)),
    "purple": ((268, 282), (0.65, 0.85), (0.6, 0.75)),
    "pink": ((318, 332), (0.45, 0.6), (0.97, 1.0)),
    "white": ((0, 360), (0.0, 0.04), (0.97, 1.0)),
    "black": ((0, 360), (0.0, 0.1), (0.0, 0.08)),
}
# Background value bands: bg_dark and bg_light are these bands; "mid" has neither label.
_TONE_BANDS = {"dark": (0.05, 0.3), "mid": (0.42, 0.62), "light": (0.8, 0.98)}
_TINT_HUES = {"warm": (12, 45), "cool": (190, 230)}
# fmt: off
_WORDS = (
    "sale", "new", "bold", "fresh", "studio", "design", "summer", "winter", "launch", "craft", "vivid", "pixel",
    "nova", "flow", "open", "shop", "join", "today", "free", "event", "week", "art", "color", "shape", "hello",
    "brand", "story", "night", "club", "fest", "pop",
)
# fmt: on


class _Rng:
    """A per-design random source: numpy's generator seeded by (seed, image ID), with helpers for scalars."""

    def __init__(self, seed: int, index: int):
        self.gen = np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32, index])

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(self.gen.random())

    def chance(self, p: float) -> bool:
        return float(self.gen.random()) < p

    def integer(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi] (both included)."""
        return int(self.gen.integers(lo, hi + 1))

    def choice(self, items: Sequence):
        return items[int(self.gen.integers(len(items)))]

    def sample(self, items: Sequence, k: int) -> list:
        return [items[i] for i in self.gen.choice(len(items), size=k, replace=False)]


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((h % 360) / 360, min(max(s, 0), 1), min(max(v, 0), 1))
    return round(r * 255), round(g * 255), round(b * 255)


def _family_color(rng: _Rng, family: str) -> tuple[int, int, int]:
    (h0, h1), (s0, s1), (v0, v1) = _FAMILY_HSV[family]
    return _hsv(rng.uniform(h0, h1), rng.uniform(s0, s1), rng.uniform(v0, v1))


@dataclass
class _Palette:
    """The background's hue, saturation and tone; every non-shape colour is a tint of it."""

    hue: float
    sat: float
    tone: str

    def color(self, value: float, sat_scale: float = 1.0) -> tuple[int, int, int]:
        return _hsv(self.hue, self.sat * sat_scale, value)

    def contrast(self, rng: _Rng) -> tuple[int, int, int]:
        """A tint far from the background's value, for lines, text and borders.

        Never as light or as dark as the white and black shape families, so it cannot pass for them.
        """
        if self.tone == "light" or (self.tone == "mid" and rng.chance(0.5)):
            return self.color(rng.uniform(0.2, 0.28), 0.7)
        return self.color(rng.uniform(0.76, 0.84), 0.5)

    def shade(self, delta: float) -> tuple[int, int, int]:
        """A tint `delta` lighter (dark backgrounds) or darker (light and mid ones) than the middle of the band."""
        lo, hi = _TONE_BANDS[self.tone]
        mid = (lo + hi) / 2
        return self.color(mid + delta if self.tone == "dark" else mid - delta)


def _render_background(rng: _Rng, kind: str, pal: _Palette, width: int, height: int) -> Image.Image:
    """The background as an RGB image: a mix map between two colours of the palette's tone band.

    The map is computed as uint8 in [0, 255] from broadcast row and column vectors, then coloured through a
    256-entry palette, which keeps a 300-px background well under a millisecond.
    """
    from PIL import Image

    lo, hi = _TONE_BANDS[pal.tone]
    span = hi - lo
    v1, v2 = lo + rng.uniform(0, 0.25) * span, hi - rng.uniform(0, 0.25) * span
    if rng.chance(0.5):
        v1, v2 = v2, v1
    xs = np.arange(width, dtype=np.float32)[None, :]
    ys = np.arange(height, dtype=np.float32)[:, None]
    if kind == "solid":
        mix = np.full((height, width), rng.uniform(0, 1), np.float32)
    elif kind == "noise":
        coarse = rng.gen.integers(0, 256, (height // 16 + 2, width // 16 + 2), dtype=np.uint8)
        blotches = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
        fine = rng.gen.integers(0, 64, (height, width), dtype=np.uint8)
        mix = (np.asarray(blotches) // 4 * 3 + fine).astype(np.float32) / 255
    elif kind == "linear_gradient":
        angle = rng.uniform(0, 2 * math.pi)
        proj = xs * math.cos(angle) + ys * math.sin(angle)
        mix = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1.0)
    elif kind == "radial_gradient":
        cx, cy = width * rng.uniform(0.3, 0.7), height * rng.uniform(0.3, 0.7)
        dist = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
        mix = dist / float(dist.max())
    elif kind == "stripes":
        angle = math.radians(rng.choice((0, 45, 90, 135)))
        period = rng.uniform(14, 30)
        proj = xs * math.cos(angle) + ys * math.sin(angle)
        mix = (np.mod(proj, period) < period / 2).astype(np.float32)
    elif kind == "dots":
        step = rng.uniform(16, 28)
        radius = step * rng.uniform(0.2, 0.32)
        dx, dy = np.mod(xs, step) - step / 2, np.mod(ys, step) - step / 2
        mix = (dx * dx + dy * dy < radius * radius).astype(np.float32)
    elif kind == "checker":
        step = rng.uniform(16, 36)
        mix = np.mod(np.floor(xs / step) + np.floor(ys / step), 2).astype(np.float32)
    else:
        raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")
    levels = Image.fromarray((mix * 255 + 0.5).astype(np.uint8), "L")
    c1, c2 = np.array(pal.color(v1), np.float32), np.array(pal.color(v2), np.float32)
    ramp = c1 + np.linspace(0, 1, 256, dtype=np.float32)[:, None] * (c2 - c1)
    levels.putpalette((ramp + 0.5).astype(np.uint8).tobytes())
    return levels.convert("RGB")


def _vignette(img: Image.Image, strength: float) -> Image.Image:
    """`img` darkened towards the corners by up to `strength`."""
    from PIL import Image, ImageChops

    width, height = img.size
    rx = ((np.arange(width, dtype=np.float32) - width / 2) / (width / 2))[None, :] ** 2
    ry = ((np.arange(height, dtype=np.float32) - height / 2) / (height / 2))[:, None] ** 2
    gain = 1 - strength * np.clip((rx + ry) / 2, 0, 1)
    mask = Image.fromarray((gain * 255 + 0.5).astype(np.uint8), "L").convert("RGB")
    return ImageChops.multiply(img, mask)


def _rotate(points: Iterable[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(x * c - y * s, x * s + y * c) for x, y in points]


@cache
def _unit_outline(shape: str) -> tuple[tuple[float, float], ...]:
    """The shape's polygon around (0, 0), radius about 1 (circles and rings are drawn as ellipses)."""
    if shape == "square":
        return ((-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8))
    if shape == "triangle":
        return tuple((math.cos(a), math.sin(a)) for a in (math.radians(-90 + 120 * i) for i in range(3)))
    if shape == "hexagon":
        return tuple((math.cos(a), math.sin(a)) for a in (math.radians(60 * i) for i in range(6)))
    if shape == "star":
        return tuple(
            ((1.0 if i % 2 == 0 else 0.42) * math.cos(a), (1.0 if i % 2 == 0 else 0.42) * math.sin(a))
            for i, a in enumerate(math.radians(-90 + 36 * i) for i in range(10))
        )
    if shape == "diamond":
        return ((0, -1.0), (0.62, 0), (0, 1.0), (-0.62, 0))
    if shape == "cross":
        a, b = 0.3, 0.95
        return (
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        )
    if shape == "heart":
        pts = []
        for i in range(36):
            t = 2 * math.pi * i / 36
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17, -y / 17 + 0.1))
        return tuple(pts)
    if shape == "arrow":
        return ((-0.95, -0.22), (0.15, -0.22), (0.15, -0.6), (0.95, 0), (0.15, 0.6), (0.15, 0.22), (-0.95, 0.22))
    raise ValueError(f"{shape!r} has no polygon; expected one of {SHAPES}")


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    radius: float,
    angle: float,
    color: tuple[int, int, int],
    outline: bool,
) -> None:
    width = max(3, round(radius / 5))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=None if outline else color, outline=color if outline else None, width=width)
        return
    if shape == "ring":
        if outline:
            inner = radius * 0.55
            draw.ellipse(box, outline=color, width=width)
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), outline=color, width=width)
        else:
            draw.ellipse(box, outline=color, width=max(3, round(radius * 0.38)))
        return
    points = [(cx + x * radius, cy + y * radius) for x, y in _rotate(_unit_outline(shape), angle)]
    if outline:
        draw.polygon(points, outline=color, width=width)
    else:
        draw.polygon(points, fill=color)


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font (no file, no download) at `size` pixels."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _place_shapes(
    rng: _Rng, layout: str, region: tuple[float, float, float, float], count_hint: int
) -> list[tuple[float, float, float]]:
    """Centres and radii (cx, cy, r) for the layout, inside `region` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = region
    w, h = x1 - x0, y1 - y0
    short = min(w, h)
    if layout == "single":
        r = short * rng.uniform(0.36, 0.45)
        return [(x0 + w / 2 + rng.uniform(-0.05, 0.05) * w, y0 + h / 2 + rng.uniform(-0.05, 0.05) * h, r)]
    if layout == "grid":
        rows, cols = rng.choice(((2, 2), (2, 3), (3, 3), (3, 4), (2, 4)))
        if w < h:
            rows, cols = cols, rows
        cw, ch = w / cols, h / rows
        r = min(cw, ch) * 0.36
        return [(x0 + cw * (c + 0.5), y0 + ch * (r_ + 0.5), r) for r_ in range(rows) for c in range(cols)]
    lo, hi = (0.11, 0.17) if layout == "few" else (0.045, 0.07)
    placed: list[tuple[float, float, float]] = []
    attempts = 0
    while len(placed) < count_hint and attempts < 200:
        attempts += 1
        r = short * rng.uniform(lo, hi)
        cx, cy = rng.uniform(x0 + r * 1.05, x1 - r * 1.05), rng.uniform(y0 + r * 1.05, y1 - r * 1.05)
        if all(math.hypot(cx - px, cy - py) > (r + pr) * 1.1 for px, py, pr in placed):
            placed.append((cx, cy, r))
    return placed


def _spread(rng: _Rng, chosen: list, n: int) -> list:
    """`n` items drawn from `chosen` so that each chosen item appears at least once (n >= len(chosen))."""
    items = list(chosen) + [rng.choice(chosen) for _ in range(n - len(chosen))]
    return [items[i] for i in rng.gen.permutation(len(items))]


def _draw_text(
    img: Image.Image,
    rng: _Rng,
    pal: _Palette,
    band: tuple[float, float],
    *,
    large: bool,
    banner: bool,
    multiline: bool,
) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    width = img.width
    y0, y1 = band
    ink = pal.contrast(rng)
    if banner:
        # A band in the contrast tint across the width, the words in the background's own tint on it.
        draw.rectangle((0, y0 + 2, width, y1 - 2), fill=ink)
        ink = pal.color(sum(_TONE_BANDS[pal.tone]) / 2)
    lines = 2 if multiline else 1
    size = round((y1 - y0) * (0.62 if large else 0.4) / lines)
    font = _font(size)
    texts = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.integer(1, 3))]
        if rng.chance(0.5):
            words = [w.upper() for w in words]
        # Drop words until the line fits, keeping at least one (a large single word is shrunk to fit below).
        while len(words) > 1 and draw.textlength(" ".join(words), font=font) > width * 0.9:
            words.pop()
        texts.append(" ".join(words))
    while size > 8 and max(draw.textlength(t, font=font) for t in texts) > width * 0.9:
        size -= 2
        font = _font(size)
    line_h = (y1 - y0) / lines
    for i, text in enumerate(texts):
        cy = y0 + line_h * (i + 0.5)
        x = width * 0.05 if rng.chance(0.4) else (width - draw.textlength(text, font=font)) / 2
        draw.text((x, cy), text, fill=ink, font=font, anchor="lm")


def render_design(index: int, seed: int = 0, *, exotic: bool = False) -> tuple[bytes, str, np.ndarray]:
    """Render design number `index` for `seed`: (encoded bytes, extension, labels as uint8[50]).

    Deterministic: the same (index, seed, exotic) gives the same bytes. `exotic` makes about 5 % of the images use
    unusual encodings (progressive / CMYK / EXIF-rotated JPEG, RGBA / palette PNG). The stages draw in this order
    (each consumes the random stream in turn): canvas and background, decorations, text band, panel, shapes, text,
    border, encoding.
    """
    from PIL import ImageDraw

    rng = _Rng(seed, index)
    labels = np.zeros(NUM_LABELS, np.uint8)

    def mark(name: str) -> None:
        labels[_LABEL_INDEX[name]] = 1

    img, pal, tone = _background(rng, mark)
    width, height = img.size
    draw = ImageDraw.Draw(img)
    _decorations(rng, draw, pal, width, height, mark)
    region, text_band = _text_band(rng, width, height, mark)
    if rng.chance(0.2):
        mark("has_panel")
        draw.rounded_rectangle(tuple(region), radius=min(width, height) * 0.06, fill=pal.shade(0.22))
    _shapes(rng, draw, pal, tone, tuple(region), mark)
    if text_band is not None:
        large, banner, multiline = (
            bool(labels[_LABEL_INDEX[k]]) for k in ("text_large", "text_banner", "text_multiline")
        )
        _draw_text(img, rng, pal, text_band, large=large, banner=banner, multiline=multiline)
    _border(rng, draw, pal, width, height, mark)
    data, ext = _encode(img, rng, exotic)
    return data, ext, labels


def _background(rng: _Rng, mark: Callable[[str], None]) -> tuple[Image.Image, _Palette, str]:
    """The canvas (224-320 px) filled with a background style in a tone band and tint; (image, palette, tone)."""
    # Non-square designs are at most 1.2:1, so a centre crop to a square (as training does) cuts at most 8 % off
    # each end and keeps borders, corner accents and text bands in view.
    short = rng.integer(224, 300)
    long = short if rng.chance(0.4) else min(320, round(short * rng.uniform(1.04, 1.2)))
    width, height = (long, short) if rng.chance(0.5) else (short, long)
    background = rng.choice(BACKGROUNDS)
    tone = rng.choice(("dark", "mid", "light"))
    tint = rng.choice(("warm", "cool", "neutral"))
    if tint == "neutral":
        pal = _Palette(0.0, 0.0, tone)
    else:
        pal = _Palette(rng.uniform(*_TINT_HUES[tint]), rng.uniform(0.3, 0.5) if tone != "light" else 0.25, tone)
        mark(f"bg_{tint}")
    mark(f"bg_{background}")
    if tone != "mid":
        mark(f"bg_{tone}")
    img = _render_background(rng, background, pal, width, height)
    if tone != "dark" and rng.chance(0.25):
        img = _vignette(img, rng.uniform(0.45, 0.6))
        mark("has_vignette")
    return img, pal, tone


def _decorations(rng: _Rng, draw, pal: _Palette, width: int, height: int, mark: Callable[[str], None]) -> None:
    """Lines, a wave, corner accents and an arc behind the shapes, each in a tint of the background."""
    short = min(width, height)
    if rng.chance(0.2):
        mark("has_diagonal_lines")
        color, step, lw = pal.contrast(rng), rng.uniform(22, 40), rng.integer(3, 5)
        sign = rng.choice((1, -1))
        for k in range(rng.integer(3, 6)):
            offset = rng.uniform(-0.3, 0.3) * width + k * step
            draw.line([(offset, 0 if sign > 0 else height), (offset + height, height if sign > 0 else 0)], color, lw)
    if rng.chance(0.2):
        mark("has_wave")
        color, amp, base = pal.contrast(rng), rng.uniform(10, 24), rng.uniform(0.3, 0.7) * height
        period, phase = rng.uniform(60, 110), rng.uniform(0, 2 * math.pi)
        pts = [(x, base + amp * math.sin(2 * math.pi * x / period + phase)) for x in range(0, width + 4, 4)]
        draw.line(pts, color, rng.integer(4, 6), joint="curve")
    if rng.chance(0.2):
        mark("has_corner_accents")
        color, leg = pal.contrast(rng), short * rng.uniform(0.16, 0.26)
        corners = [(0, 0, 1, 1), (width, height, -1, -1), (width, 0, -1, 1), (0, height, 1, -1)]
        for x, y, sx, sy in corners[: rng.choice((2, 4))]:
            draw.polygon([(x, y), (x + sx * leg, y), (x, y + sy * leg)], fill=color)
    if rng.chance(0.2):
        mark("has_arc")
        color, rad = pal.contrast(rng), short * rng.uniform(0.45, 0.65)
        cx, cy = rng.choice(((0, 0), (width, 0), (0, height), (width, height)))
        draw.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), outline=color, width=rng.integer(10, 16))


def _text_band(
    rng: _Rng, width: int, height: int, mark: Callable[[str], None]
) -> tuple[list[float], tuple[float, float] | None]:
    """Where shapes go and where the text goes: text, if any, takes a band at the top or bottom and the shapes'
    region shrinks to leave it free; (shape region [x0, y0, x1, y1], text band (y0, y1) or None)."""
    region = [width * 0.06, height * 0.06, width * 0.94, height * 0.94]
    text_band = None
    if rng.chance(0.42):
        mark("has_text")
        large, banner, multiline = rng.chance(0.4), rng.chance(0.35), rng.chance(0.4)
        band_h = height * (0.3 if large or multiline else 0.2)
        if rng.chance(0.5):
            text_band, region[1] = (height * 0.05, height * 0.05 + band_h), height * 0.05 + band_h
        else:
            text_band, region[3] = (height * 0.95 - band_h, height * 0.95), height * 0.95 - band_h
        for name, on in (("text_large", large), ("text_banner", banner), ("text_multiline", multiline)):
            if on:
                mark(name)
    return region, text_band


def _shapes(rng: _Rng, draw, pal: _Palette, tone: str, region: tuple[float, ...], mark: Callable[[str], None]) -> None:
    """The figures: a layout, their kinds and colour families, outline and shadow styles; labels for each."""
    layout = rng.choice(LAYOUTS)
    mark(f"layout_{layout}")
    count_hint = {"single": 1, "few": rng.integer(2, 4), "many": rng.integer(8, 14), "grid": 0}[layout]
    spots = _place_shapes(rng, layout, region, count_hint)
    n = len(spots)
    kinds = rng.sample(SHAPES, min(n, 1 if layout == "single" else rng.integer(1, 2 if layout == "grid" else 3)))
    allowed = [c for c in COLORS if not (c == "white" and tone == "light") and not (c == "black" and tone == "dark")]
    families = rng.sample(allowed, min(n, 2 if rng.chance(0.4) else 1))
    outline = rng.chance(0.25)
    shadow = tone != "dark" and rng.chance(0.35)
    if layout == "grid":
        # A grid cycles its kinds and colours like a pattern; n >= 4 cells cover every (kind, colour) pair.
        shape_of = [kinds[i % len(kinds)] for i in range(n)]
        family_of = [families[(i // len(kinds)) % len(families)] for i in range(n)]
    else:
        shape_of, family_of = _spread(rng, kinds, n), _spread(rng, families, n)
    shadow_color = pal.color(_TONE_BANDS[tone][0] * 0.5, 0.8)
    for (cx, cy, r), shape, family in zip(spots, shape_of, family_of, strict=True):
        color = _family_color(rng, family)
        # Squares and diamonds turn a little only (a square turned 45 degrees would read as a diamond).
        limit = math.radians(18) if shape in ("square", "diamond") else math.pi
        angle = rng.uniform(-limit, limit)
        if shadow:
            off = max(3.0, r * 0.12)
            _draw_shape(draw, shape, cx + off, cy + off, r, angle, shadow_color, outline)
        _draw_shape(draw, shape, cx, cy, r, angle, color, outline)
    for name in {f"shape_{s}" for s in shape_of} | {f"color_{f}" for f in family_of}:
        mark(name)
    if len(set(family_of)) > 1:
        mark("palette_multicolor")
    if outline:
        mark("style_outline")
    if shadow:
        mark("style_shadow")


def _border(rng: _Rng, draw, pal: _Palette, width: int, height: int, mark: Callable[[str], None]) -> None:
    """A border in a tint of the background, sometimes doubled."""
    if rng.chance(0.3):
        mark("has_border")
        color, bw = pal.contrast(rng), rng.integer(5, 9)
        draw.rectangle((0, 0, width - 1, height - 1), outline=color, width=bw)
        if rng.chance(0.45):
            mark("border_double")
            inset = bw + rng.integer(5, 8)
            draw.rectangle((inset, inset, width - 1 - inset, height - 1 - inset), outline=color, width=max(3, bw - 3))


def _encode(img: Image.Image, rng: _Rng, exotic: bool) -> tuple[bytes, str]:
    """JPEG (quality 90), about 5 % PNG; with `exotic`, about 5 % unusual encodings of the same pixels."""
    from PIL import Image

    out = io.BytesIO()
    roll = float(rng.gen.random())
    if exotic and PNG_FRACTION <= roll < PNG_FRACTION + EXOTIC_FRACTION:
        kind = rng.choice(("progressive", "cmyk", "exif_rotated", "rgba_png", "palette_png"))
        if kind == "progressive":
            img.save(out, "JPEG", quality=JPEG_QUALITY, progressive=True)
        elif kind == "cmyk":
            img.convert("CMYK").save(out, "JPEG", quality=JPEG_QUALITY)
        elif kind == "exif_rotated":
            # Stored turned a quarter; orientation 6 tells readers to turn it back. Labels ignore orientation.
            exif = Image.Exif()
            exif[0x0112] = 6
            img.transpose(Image.Transpose.ROTATE_90).save(out, "JPEG", quality=JPEG_QUALITY, exif=exif)
        elif kind == "rgba_png":
            rgba = img.convert("RGBA")
            rgba.putalpha(255)
            rgba.save(out, "PNG", compress_level=1)
        else:
            img.convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(out, "PNG", compress_level=1)
        return out.getvalue(), "png" if kind.endswith("png") else "jpg"
    if roll < PNG_FRACTION:
        img.save(out, "PNG", compress_level=1)
        return out.getvalue(), "png"
    img.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), "jpg"
