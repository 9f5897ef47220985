"""Generated product-like images (patterned T-shirts in colours) for the demo and tests.

Real clothing photos need ImageNet features; these images stay distinguishable even for a
random-init backbone (its features respond to texture and colour: a logistic probe on them
separates the six patterns with 0.95 accuracy at 128 px), so an offline demo on them is
honest about what it shows. Each image is one T-shirt silhouette with one pattern (the
``label`` column) in one colour (the ``colour`` column), with random size, offset, pattern
phase and spacing, background tint and pixel noise, written as JPEG.

The catalog also carries a known three-level taxonomy, ``department > family > label``
(:data:`PATTERN_TAXONOMY`), and multi-label ``tags`` that follow from what is drawn
(:data:`COLOUR_TAGS`, :data:`PATTERN_TAGS`: one to three tags per product), for the
hierarchy and multi-label features and their tests.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PATTERNS = ("plain", "stripes", "dots", "checks", "grid", "diagonal")
COLOURS = {
    "red": (200, 30, 40),
    "green": (40, 150, 60),
    "blue": (40, 70, 200),
    "yellow": (230, 200, 30),
    "black": (25, 25, 25),
}


#: pattern -> (department, family): the taxonomy department > family > label.
PATTERN_TAXONOMY = {
    "plain": ("basics", "solid"),
    "stripes": ("prints", "lines"),
    "grid": ("prints", "lines"),
    "diagonal": ("prints", "lines"),
    "dots": ("prints", "shapes"),
    "checks": ("prints", "shapes"),
}

#: Tags that follow from the colour and from the pattern.
COLOUR_TAGS = {
    "red": ("warm",),
    "green": ("cool",),
    "blue": ("cool",),
    "yellow": ("warm", "bright"),
    "black": ("dark",),
}
PATTERN_TAGS = {
    "plain": (),
    "stripes": ("striped",),
    "grid": ("lined",),
    "diagonal": ("striped", "lined"),
    "dots": ("dotted",),
    "checks": ("checked",),
}

#: Columns of a generated catalog.
CATALOG_COLUMNS = ["id", "file", "label", "colour", "department", "family", "tags", "title"]


def product_tags(pattern: str, colour: str) -> tuple[str, ...]:
    """The sorted tags of a product with this pattern and colour."""
    return tuple(sorted(set(COLOUR_TAGS[colour]) | set(PATTERN_TAGS[pattern])))


def _tshirt(size: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """A T-shirt outline, randomly scaled and shifted a little."""
    scale = rng.uniform(0.85, 1.0)
    dx, dy = rng.uniform(-0.05, 0.05, size=2)
    outline = [(0.3, 0.12), (0.7, 0.12), (0.95, 0.3), (0.82, 0.42), (0.72, 0.34), (0.72, 0.88),
               (0.28, 0.88), (0.28, 0.34), (0.18, 0.42), (0.05, 0.3)]  # fmt: skip
    return [(((x - 0.5) * scale + 0.5 + dx) * size, ((y - 0.5) * scale + 0.5 + dy) * size) for x, y in outline]


def draw_product(pattern: str, colour: tuple[int, int, int], size: int, rng: np.random.Generator) -> Image.Image:
    """Draws one T-shirt with a pattern in a colour on a light, slightly noisy background."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}")
    tint = tuple(int(v) for v in rng.integers(225, 256, size=3))
    fill = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in colour)
    fabric = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(fabric)
    step = max(4, int(size * rng.uniform(0.08, 0.12)))
    offset = int(rng.integers(0, step))
    if pattern == "plain":
        draw.rectangle((0, 0, size, size), fill=fill)
    elif pattern == "stripes":
        for y in range(offset - step, size, step):
            draw.rectangle((0, y, size, y + step // 2), fill=fill)
    elif pattern == "dots":
        for y in range(offset, size, step):
            for x in range(offset, size, step):
                draw.ellipse((x - step / 4, y - step / 4, x + step / 4, y + step / 4), fill=fill)
    elif pattern == "checks":
        for y in range(0, size, step):
            for x in range(0, size, step):
                if ((x + y) // step) % 2 == 0:
                    draw.rectangle((x, y, x + step, y + step), fill=fill)
    elif pattern == "grid":
        for position in range(offset, size, step):
            draw.line((0, position, size, position), fill=fill, width=2)
            draw.line((position, 0, position, size), fill=fill, width=2)
    else:  # diagonal
        for x in range(-size, 2 * size, step):
            draw.line((x, 0, x + size, size), fill=fill, width=max(2, step // 3))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(_tshirt(size, rng), fill=255)
    image = Image.new("RGB", (size, size), tint)
    image.paste(fabric, (0, 0), mask)
    pixels = np.asarray(image, np.int16) + rng.integers(-6, 7, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def generate_catalog(
    folder: str | Path,
    *,
    per_class: int = 8,
    patterns: tuple[str, ...] = PATTERNS,
    colours: tuple[str, ...] | None = None,
    size: int = 96,
    seed: int = 0,
) -> Path:
    """Writes images and ``catalog.csv`` (:data:`CATALOG_COLUMNS`; tags joined by ``|``) into ``folder``.

    Args:
        folder: output folder (created).
        per_class: images per (pattern, colour) pair.
        patterns: patterns to draw (the ``label`` column).
        colours: colour names from :data:`COLOURS` (the ``colour`` column); default all.
        size: image side in pixels.
        seed: random seed; the same seed writes the same files.

    Returns:
        The path of ``catalog.csv``.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = tuple(colours or COLOURS)
    records = []
    for pattern in patterns:
        for colour in colours:
            for number in range(per_class):
                item_id = f"{pattern}-{colour}-{number:03d}"
                relative = f"images/{item_id}.jpg"
                draw_product(pattern, COLOURS[colour], size, rng).save(folder / relative, quality=92)
                title = f"{colour.title()} {pattern} T-shirt #{number + 1}"
                department, family = PATTERN_TAXONOMY[pattern]
                records.append(
                    {
                        "id": item_id,
                        "file": relative,
                        "label": pattern,
                        "colour": colour,
                        "department": department,
                        "family": family,
                        "tags": "|".join(product_tags(pattern, colour)),
                        "title": title,
                    }
                )
    catalog = folder / "catalog.csv"
    with open(catalog, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CATALOG_COLUMNS)
        writer.writeheader()
        writer.writerows(records)
    return catalog
