"""Hashes written with every sample: exact (sha256 of the bytes downloaded), perceptual (64-bit
DCT pHash of the decoded image) and the hash of the normalised alt-text.  The filter stage
counts and joins on these, so they are defined once, here."""

from __future__ import annotations

import hashlib
import re
import unicodedata

import cv2
import numpy as np

_SPACE = re.compile(r"\s+")
_BIT_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def normalize_text(text: str | None) -> str:
    """NFKC, case-folded, whitespace collapsed: the form under which alt-texts are 'the same'."""
    if not text:
        return ""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def text_hash(text: str | None) -> int:
    """Unsigned 64-bit hash of :func:`normalize_text` (blake2b, stable across processes)."""
    digest = hashlib.blake2b(normalize_text(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def phash(bgr_or_gray: np.ndarray) -> int:
    """64-bit perceptual hash: 32x32 grey, 2-D DCT, top-left 8x8 compared with its median.

    Robust to re-encoding and mild resizing; compare with :func:`hamming`."""
    gray = bgr_or_gray if bgr_or_gray.ndim == 2 else cv2.cvtColor(bgr_or_gray, cv2.COLOR_BGR2GRAY)
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = (low > np.median(low)).astype(np.uint64)
    return int((bits * _BIT_WEIGHTS).sum(dtype=np.uint64))


def hamming(a: int, b: int) -> int:
    return (int(a) ^ int(b)).bit_count()
