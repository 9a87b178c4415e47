"""Small image sets drawn with Pillow, so that the tests need no download and no folder beside the clone.

    photos(root)   root/ants, root/bees: photo-like pictures (JPEG and PNG, several sizes, square or not)
                   and a GIF placeholder in ants/, as PyTorch's hymenoptera archive holds one
    digits(root)   root/0 .. root/9: 32x32 greyscale PNG digits, as the shared digits set holds
    framed(root)   root/0 .. root/9: square pictures in a red frame, so a screenshot shows whether the whole
                   picture is on screen

Every picture comes from a seeded generator: the same files, byte for byte, on every run and machine with the
same Pillow. The two photo classes differ in colour and shape (dark, thin ants on green; striped yellow bees
on warm tones) so that a model can learn them; noise keeps each picture distinct and gives it the many
colours of a photo, which the window tests look for."""
import os
import random

from PIL import Image, ImageDraw, ImageFont

PHOTO_SIZES = ((96, 64), (64, 96), (80, 80), (96, 72), (72, 96))


def _noise(rng, size, mode="RGB"):
    bands = len(mode)
    return Image.frombytes(mode, size, rng.randbytes(size[0] * size[1] * bands))


def _gradient(rng, size, low, high):
    """A two-colour vertical gradient: a smooth background, as out-of-focus photo backgrounds are."""
    top = tuple(rng.randint(a, b) for a, b in zip(low, high))
    bottom = tuple(rng.randint(a, b) for a, b in zip(low, high))
    column = Image.new("RGB", (1, 2))
    column.putpixel((0, 0), top)
    column.putpixel((0, 1), bottom)
    return column.resize(size, Image.BILINEAR)


def _ant(draw, rng, w, h):
    """Three dark, reddish-brown segments in a row, with thin legs."""
    s = rng.uniform(0.08, 0.14) * min(w, h)
    x, y = rng.uniform(0.25, 0.55) * w, rng.uniform(0.3, 0.7) * h
    colour = (rng.randint(30, 90), rng.randint(10, 40), rng.randint(0, 25))
    for k, r in enumerate((0.8, 0.6, 1.1)):
        cx = x + k * 1.6 * s
        draw.ellipse((cx - r * s, y - 0.7 * r * s, cx + r * s, y + 0.7 * r * s), fill=colour)
    for k in range(3):
        lx = x + (0.8 + 0.6 * k) * s
        draw.line((lx, y, lx - 0.5 * s, y + 1.6 * s), fill=colour, width=1)
        draw.line((lx, y, lx - 0.5 * s, y - 1.6 * s), fill=colour, width=1)


def _bee(draw, rng, w, h):
    """A round yellow body with black stripes and pale wings."""
    rx, ry = rng.uniform(0.18, 0.28) * w, rng.uniform(0.14, 0.22) * h
    x, y = rng.uniform(0.35, 0.65) * w, rng.uniform(0.35, 0.65) * h
    draw.ellipse((x - 0.6 * rx, y - 1.6 * ry, x + 0.4 * rx, y - 0.2 * ry), fill=(215, 225, 235))
    draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=(rng.randint(220, 255), rng.randint(170, 210), 20))
    for k in (-0.45, 0.0, 0.45):
        sx = x + k * rx
        draw.rectangle((sx - 0.1 * rx, y - 0.9 * ry, sx + 0.1 * rx, y + 0.9 * ry), fill=(20, 15, 10))


def photo(cls, seed):
    """One picture of class 'ants' or 'bees', the same for the same seed."""
    rng = random.Random(f"{cls}-{seed}")
    size = PHOTO_SIZES[seed % len(PHOTO_SIZES)]
    if cls == "ants":
        img = _gradient(rng, size, (40, 90, 20), (120, 170, 80))
    else:
        img = _gradient(rng, size, (170, 80, 20), (250, 200, 120))
    draw = ImageDraw.Draw(img)
    (_ant if cls == "ants" else _bee)(draw, rng, *size)
    return Image.blend(img, _noise(rng, size), 0.12)


def photos(root, per_class=50):
    """root/ants and root/bees with per_class pictures each (every fifth a PNG), and root/ants/placeholder.gif."""
    for cls in ("ants", "bees"):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(per_class):
            ext = "png" if i % 5 == 4 else "jpg"
            photo(cls, i).save(os.path.join(root, cls, f"{cls[:-1]}_{i:03d}.{ext}"), quality=85)
    # The archive's "image not found" GIF: a real image file of a type the tool does not read.
    Image.new("P", (40, 30), 1).save(os.path.join(root, "ants", "placeholder.gif"))
    return str(root)


def _glyph(digit):
    """The digit drawn with Pillow's default font, cropped to its ink: white on black, mode L."""
    font = ImageFont.load_default()
    canvas = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(canvas).text((8, 8), str(digit), fill=255, font=font)
    return canvas.crop(canvas.getbbox())


def digits(root, per_class=32):
    """root/0 .. root/9 with per_class 32x32 PNGs each: the digit at a random size, place, slant and brightness."""
    glyphs = [_glyph(d) for d in range(10)]
    for d, glyph in enumerate(glyphs):
        os.makedirs(os.path.join(root, str(d)), exist_ok=True)
        for i in range(per_class):
            rng = random.Random(f"digit-{d}-{i}")
            height = rng.randint(18, 26)
            width = max(6, round(glyph.width * height / glyph.height * rng.uniform(0.8, 1.2)))
            ink = glyph.resize((width, height), Image.BILINEAR).rotate(rng.uniform(-12, 12), Image.BILINEAR,
                                                                       expand=True)
            img = Image.new("L", (32, 32), 0)
            x, y = rng.randint(0, max(0, 32 - ink.width)), rng.randint(0, max(0, 32 - ink.height))
            img.paste(rng.randint(170, 255), (x, y), ink)
            img = Image.blend(img, _noise(rng, (32, 32), "L"), 0.08)
            img.save(os.path.join(root, str(d), f"digit_{i:04d}.png"))
    return str(root)


FRAME = (230, 20, 20)


def framed(root, classes=10, per_class=2, size=64):
    """root/0 .. root/<classes - 1> with per_class PNGs each: a grey square, its class in white, inside a 3-pixel
    red frame (FRAME) that no other pixel shares."""
    font = ImageFont.load_default()
    for c in range(classes):
        os.makedirs(os.path.join(root, str(c)), exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", (size, size), (60 + 20 * i, 60, 60))
            draw = ImageDraw.Draw(img)
            draw.rectangle((0, 0, size - 1, size - 1), outline=FRAME, width=3)
            draw.text((size // 3, size // 3), str(c), fill=(255, 255, 255), font=font)
            img.save(os.path.join(root, str(c), f"framed_{i}.png"))
    return str(root)
