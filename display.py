"""What the two windows (feedback_gui.py, inference_window.py) share: a Tk root opened on the display, and
pictures decoded and fitted for it.

tkinter is imported only inside open_root, so the headless run and the batch CLI work where Tk is missing.
"""
import os
import sys

from PIL import ExifTags, Image

from dataset import upright_rgb
from user_errors import UserError

SHARP_FROM = 3  # an image enlarged this much or more keeps square pixels: a small digit blurs into a smudge


class NoDisplayError(UserError):
    """There is no display to open a window on; the message names why and that window's ways out."""


def open_root(no_display, class_name="Tk"):
    """A Tk root on the display, withdrawn until its window is built, or NoDisplayError with the message
    `no_display` (a template with {why}) when there is no display to open it on."""
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        raise NoDisplayError(no_display.format(why="DISPLAY is not set"))
    try:
        import tkinter
    except ImportError:
        raise NoDisplayError(no_display.format(why="tkinter is missing: install python3-tk")) from None
    try:
        root = tkinter.Tk(className=class_name)
    except tkinter.TclError as err:
        raise NoDisplayError(no_display.format(why=f"cannot open {os.environ.get('DISPLAY')} ({err})")) from None
    root.withdraw()
    return root


def fit(picture, box):
    """The picture scaled to fit box (width, height), aspect ratio kept: small images are enlarged, large ones
    shrunk."""
    w, h = picture.size
    scale = min(box[0] / w, box[1] / h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return picture.resize(size, Image.NEAREST if scale >= SHARP_FROM else Image.BILINEAR)


def load_picture(path, screen):
    """An image decoded for display, upright and at most screen-sized (a JPEG decodes at 1/2..1/8 scale for
    free)."""
    with Image.open(path) as img:
        # a photo stored sideways is turned after the decode: its draft asks for the screen turned with it
        turned = img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
        img.draft("RGB", screen[::-1] if turned else screen)
        picture = upright_rgb(img)
    picture.thumbnail(screen)
    return picture
