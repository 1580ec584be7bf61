"""thumbnail (python3 + Pillow): makes a thumbnail of an image.

Request:
    {"image": "<base64 of a JPEG, PNG, GIF, WebP, BMP or TIFF file>",
     "size": [W, H],          # bounding box, default [128, 128], 1..2048 each
     "format": "JPEG",        # JPEG (default), PNG or WEBP
     "quality": 85}           # 1..95, for JPEG and WEBP
Response:
    {"thumbnail": "<base64>", "format": "JPEG", "width": w, "height": h,
     "bytes": n, "source": {"format": "PNG", "mode": "RGB",
     "width": W0, "height": H0, "bytes": n0}}

The aspect ratio is kept (the result fits inside the box and is never
larger than the source); the EXIF orientation is applied; transparency is
flattened onto white for JPEG. A bad request raises ValueError, which the
agent answers as {"error": "ValueError: ..."}.

Needs the language image built with `rootfs/mk_rtimage.sh --with python3-pil
python3` (see debian-packages). Pillow is imported and its codecs are
exercised once at load time, so that work lands in the diff snapshot and a
restored VM starts with it done.
"""

import base64
import binascii
import io
import warnings

from PIL import Image, ImageOps

MAX_INPUT_BYTES = 3 << 20  # the request frame is at most 4 MiB of JSON
MAX_PIXELS = 40_000_000
MAX_SIDE = 2048
FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
DEFAULT_SIZE = (128, 128)
DEFAULT_QUALITY = 85
RESAMPLE = Image.Resampling.LANCZOS

# Pillow refuses images over twice its own limit; ours is checked first.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def _warm_up():
    """Registers every codec plugin and runs the encoders once."""
    Image.init()
    img = Image.new("RGB", (16, 16), (200, 120, 40))
    img.thumbnail((8, 8), RESAMPLE)
    for fmt in FORMATS:
        if fmt in Image.SAVE:
            img.save(io.BytesIO(), fmt)


_warm_up()


def _size(value):
    if value is None:
        return DEFAULT_SIZE
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError("size must be [width, height] in pixels")
    if not all(1 <= v <= MAX_SIDE for v in value):
        raise ValueError(f"size must be 1..{MAX_SIDE} pixels each way, got {value}")
    return tuple(value)


def _format(value):
    fmt = "JPEG" if value is None else value
    if not isinstance(fmt, str):
        raise ValueError("format must be a string")
    fmt = fmt.upper()
    if fmt == "JPG":
        fmt = "JPEG"
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {value!r}")
    if fmt not in Image.SAVE:
        raise ValueError(f"this Pillow cannot write {fmt}")
    return fmt


def _quality(value):
    if value is None:
        return DEFAULT_QUALITY
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 95:
        raise ValueError("quality must be an integer 1..95")
    return value


def _decode(text):
    if not isinstance(text, str) or not text:
        raise ValueError('"image" must be a non-empty base64 string')
    if len(text) > MAX_INPUT_BYTES * 4 // 3 + 4:
        raise ValueError(f"image is larger than {MAX_INPUT_BYTES} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError('"image" is not valid base64') from None


def _flatten(img):
    """RGB for JPEG: alpha composited onto white, palettes expanded."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode not in ("RGB", "L"):
        return img.convert("RGB")
    return img


def handle(request):
    if not isinstance(request, dict):
        raise ValueError('the request must be an object with an "image" field')
    data = _decode(request.get("image"))
    box = _size(request.get("size"))
    fmt = _format(request.get("format"))
    quality = _quality(request.get("quality"))

    try:
        with warnings.catch_warnings():
            # The size is checked below, with a clearer message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise ValueError(f"image is over the {MAX_PIXELS}-pixel limit") from None
    except (Image.UnidentifiedImageError, OSError) as e:
        raise ValueError(f"not an image Pillow can read: {e}") from None
    source = {"format": img.format, "mode": img.mode, "width": img.width,
              "height": img.height, "bytes": len(data)}
    if img.width * img.height > MAX_PIXELS:
        raise ValueError(f"image of {img.width}x{img.height} pixels is over the "
                         f"{MAX_PIXELS}-pixel limit")
    try:
        # JPEG can decode at 1/2, 1/4 or 1/8 scale directly: far less work.
        img.draft("RGB", (box[0] * 2, box[1] * 2))
        img = ImageOps.exif_transpose(img)
        img.thumbnail(box, RESAMPLE)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode the image: {e}") from None

    out = io.BytesIO()
    if fmt == "JPEG":
        _flatten(img).save(out, "JPEG", quality=quality, optimize=True)
    elif fmt == "WEBP":
        img.save(out, "WEBP", quality=quality, method=4)
    else:
        if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        img.save(out, "PNG", optimize=True)
    body = out.getvalue()
    return {
        "thumbnail": base64.b64encode(body).decode("ascii"),
        "format": fmt,
        "mime": FORMATS[fmt],
        "width": img.width,
        "height": img.height,
        "bytes": len(body),
        "source": source,
    }
