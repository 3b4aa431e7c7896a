"""Safe decode -> resize -> JPEG encode, producing compact bytes (never arrays) for the block.

* Sniff the magic bytes, then read only the header (Pillow, lazy) and refuse images over
  ``max_pixels`` before any pixel is allocated (decompression bombs).
* JPEG: DCT-scaled decode by OpenCV (``IMREAD_REDUCED_COLOR_{2,4,8}``), choosing the largest
  reduction that still leaves the side that matters >= the target size; this is where most of
  the speed over img2dataset comes from.  A missing end-of-image marker means a truncated file
  (libjpeg would silently pad it with grey).
* Everything else (PNG, GIF, WebP, BMP, TIFF, CMYK JPEG): Pillow, first frame, EXIF orientation
  applied, alpha composited on white, 16-bit scaled to 8-bit.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from align_ray.data.config import DataConfig
from align_ray.data.errors import Drop
from align_ray.data.hashing import phash

cv2.setNumThreads(1)

_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
            4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
_ORIENT_SWAPS = {5, 6, 7, 8}


@dataclass
class Processed:
    jpg: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    phash: int
    format: str


def sniff(data: bytes) -> str:
    """Image format from magic bytes; raises Drop for non-images and unsupported formats."""
    if not data:
        raise Drop("empty_body", "0 bytes")
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    text = head.lstrip().lower()
    if text.startswith((b"<svg", b"<?xml")):
        raise Drop("unsupported_format", "svg/xml", retryable=False)
    if text.startswith((b"<!doctype", b"<html", b"<head", b"<body", b"<")):
        raise Drop("not_an_image", "HTML/markup body", retryable=False)
    if head[4:8] == b"ftyp":
        raise Drop("unsupported_format", f"ISO-BMFF {head[8:12]!r} (avif/heic)", retryable=False)
    raise Drop("not_an_image", f"unrecognised bytes {head[:8]!r}", retryable=False)


def _target_dims(w: int, h: int, cfg: DataConfig) -> tuple[float, str]:
    """Scale factor for the resize mode and which side decides it."""
    s = cfg.image_size
    if cfg.resize_mode in ("center_crop", "keep_ratio"):
        scale = s / min(w, h)
    elif cfg.resize_mode in ("keep_ratio_largest", "border"):
        scale = s / max(w, h)
    else:
        scale = 1.0
    if cfg.resize_only_if_bigger:
        scale = min(scale, 1.0)
    return scale, cfg.resize_mode


def _jpeg_reduction(w: int, h: int, cfg: DataConfig) -> int:
    scale, _ = _target_dims(w, h, cfg)
    for r in (8, 4, 2):
        if scale * r <= 1.0:  # the reduced image is still at least as large as the target
            return r
    return 1


def _decode_jpeg(data: bytes, w: int, h: int, cfg: DataConfig) -> np.ndarray:
    sos, eoi = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    if sos < 0 or eoi < sos:
        raise Drop("truncated_image", "JPEG has no end-of-image marker after its last scan",
                   retryable=False)
    flag = _REDUCED[_jpeg_reduction(w, h, cfg)]
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)  # applies EXIF orientation
    if img is None:
        raise Drop("decode_error", "OpenCV could not decode the JPEG", retryable=False)
    return img


def _decode_pil(im: Image.Image) -> np.ndarray:
    im.seek(0)  # first frame of animations
    im.load()
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im)
        arr = (arr >> 8) if arr.max(initial=0) > 255 and im.mode != "I" else arr
        if im.mode == "I":
            hi = max(int(arr.max(initial=0)), 1)
            arr = arr * (255.0 / hi) if hi > 255 else arr
        return cv2.cvtColor(arr.clip(0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    rgb = np.asarray(im.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _scale(img: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Resize keeping the aspect ratio so the deciding side matches the target."""
    h, w = img.shape[:2]
    scale, mode = _target_dims(w, h, cfg)
    if mode == "no" or abs(scale - 1.0) < 1e-9:
        return img
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    # the DCT-scaled decode already did the power-of-two part of a downscale, so what is left
    # is < 2x, where bilinear does not alias and costs a sixth of INTER_AREA
    interp = cv2.INTER_AREA if scale < 0.5 else cv2.INTER_LINEAR if scale < 1 else cv2.INTER_LANCZOS4
    return cv2.resize(img, (nw, nh), interpolation=interp)


def _frame(img: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Center crop or pad (border) to the square target, per the resize mode."""
    s = cfg.image_size
    h, w = img.shape[:2]
    if cfg.resize_mode == "center_crop":
        side = min(s, h, w)  # square; smaller than s only with resize_only_if_bigger
        y, x = (h - side) // 2, (w - side) // 2
        return img[y:y + side, x:x + side]
    if cfg.resize_mode == "border" and (h < s or w < s):
        top, left = (s - h) // 2, (s - w) // 2
        color = list(reversed(cfg.border_color))  # RGB -> BGR
        return cv2.copyMakeBorder(img, max(0, top), max(0, s - h - top), max(0, left),
                                  max(0, s - w - left), cv2.BORDER_CONSTANT, value=color)
    return img


def process_image(data: bytes, cfg: DataConfig) -> Processed:
    """Decode ``data`` safely, resize per ``cfg``, re-encode as JPEG; raise Drop on bad input."""
    fmt = sniff(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > cfg.max_pixels:
                raise Drop("too_many_pixels", f"{w}x{h} > max_pixels {cfg.max_pixels}",
                           retryable=False)
            orientation = im.getexif().get(0x0112, 1) if fmt in ("jpeg", "webp", "tiff") else 1
            if fmt == "jpeg" and im.mode in ("RGB", "L"):
                img = _decode_jpeg(data, w, h, cfg)
            else:
                img = _decode_pil(im)
    except Drop:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own limit (2x its MAX_IMAGE_PIXELS)
        raise Drop("too_many_pixels", str(e), retryable=False) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise Drop("decode_error", f"{fmt}: {e}", retryable=False) from None
    ow, oh = (h, w) if orientation in _ORIENT_SWAPS else (w, h)
    scaled = _scale(img, cfg)
    ph = phash(scaled)  # the whole picture (before any crop), at thumbnail cost
    out = _frame(scaled, cfg)
    ok, enc = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality])
    if not ok:
        raise Drop("encode_error", "JPEG encode failed", retryable=False)
    return Processed(enc.tobytes(), out.shape[1], out.shape[0], ow, oh, ph, fmt)
