"""The vision-language demo's data: small images of one coloured shape each, drawn at run time.

Each sample is a chat: the user turn shows the image and asks ``PROMPT``; the assistant answers
the shape's colour, one of the eight ``COLOURS`` (``red``, ``cyan``, ...). The shape (circle,
square or triangle), its size and its place vary at random, so the answer is in the image only
(the prompt is the same for every sample) and no validation image is a training image.

Why the colour and not the shape too: a vision tower from random weights learns to tell colours
apart within the demo's minutes on a CPU, but telling shapes (or quarters of the image) apart
took it far longer than that in trials; the demo is there to show learning, fast.

Why drawn and not shipped: the images are fully determined by the split's seed, so the demo
needs no image files, the same run gives the same data on every machine, and
``make_demo_vlm_assets.py`` beside the model config stays the only generator of assets.
"""

from __future__ import annotations

import io
import json
import random
from typing import Any

from automodel_cli.errors import UserError

PROMPT = "What colour is the shape?"
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 60, 220), "yellow": (230, 200, 20),
           "orange": (245, 130, 20), "purple": (130, 40, 170), "black": (0, 0, 0), "cyan": (20, 200, 210)}
SHAPES = ("circle", "square", "triangle")
#: White, not grey: the processor maps mid-grey to 0, and a patch that is background plus part of
#: a shape would then be the shape's colour scaled, which the vision tower's layer norm cannot
#: tell from a patch filled with it (the shape's outline would be invisible).
BACKGROUND = (255, 255, 255)
#: Samples per split, drawn in this order from one seeded sequence of distinct images.
SPLITS = {"train": 2000, "validation": 200}
SEED = 0
IMAGE_SIZE = 32


def draw_shape(colour: str, shape: str, box: tuple[int, int, int, int], size: int = IMAGE_SIZE):
    """A ``size`` px RGB image, white background, with ``shape`` filled in ``colour`` in ``box``."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = box
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)
    return image


def shape_samples(seed: int = SEED) -> dict[str, list[tuple[str, str, tuple[int, int, int, int]]]]:
    """Each split's (colour, shape, box) draws: colours in turn (balanced); the shape, its size and
    its place at random; every draw distinct, so no validation image is also a training image."""
    rng = random.Random(seed)
    seen: set[tuple] = set()
    draws = []
    while len(draws) < sum(SPLITS.values()):
        colour = list(COLOURS)[len(draws) % len(COLOURS)]
        side = rng.randint(IMAGE_SIZE // 4, IMAGE_SIZE * 3 // 4)
        left, top = rng.randint(0, IMAGE_SIZE - side), rng.randint(0, IMAGE_SIZE - side)
        draw = (colour, rng.choice(SHAPES), (left, top, left + side - 1, top + side - 1))
        if draw not in seen:
            seen.add(draw)
            draws.append(draw)
    splits, start = {}, 0
    for name, n in SPLITS.items():
        splits[name], start = draws[start:start + n], start + n
    return splits


def demo_vlm(path: str | None, split: str, options: dict[str, Any]):
    """The ``demo-vlm`` dataset factory: the split drawn as the normalised image-text table of
    ``multimodal.load_multimodal`` (``messages`` JSON, ``images`` as PNG bytes, ``source``).
    ``train`` has 2000 samples, ``validation`` (also ``eval``/``test``) 200 others, either
    sliced by sample as ``train[:64]``; ``path`` is not used (there are no files)."""
    import datasets

    name, _, rest = split.partition("[")
    base = {"eval": "validation", "test": "validation"}.get(name, name)
    try:
        if base not in SPLITS:
            raise ValueError(base)
        bounds = [int(b) if b.strip() else None for b in rest.removesuffix("]").split(":")] if rest else [None, None]
        if len(bounds) != 2:
            raise ValueError(rest)
    except ValueError:
        raise UserError(f"The demo-vlm dataset has no split `{split}`.",
                        "Use data.split=train and data.eval_split=validation, optionally sliced "
                        "by sample: train[:64], validation[10:20].") from None
    draws = shape_samples()[base]
    start = bounds[0] or 0
    messages, images, sources = [], [], []
    for index, (colour, shape, box) in enumerate(draws[slice(*bounds)], start=start + 1):
        buffer = io.BytesIO()
        draw_shape(colour, shape, box).save(buffer, format="PNG")
        images.append([{"bytes": buffer.getvalue(), "path": None}])
        messages.append(json.dumps([
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": colour}]},
        ]))
        sources.append(f"demo-vlm {base} sample {index}")
    return datasets.Dataset.from_dict({"messages": messages, "images": images, "source": sources})
