#!/usr/bin/env python
"""Decode quality: our DCT-reduced JPEG decode + resize against a full decode + area resize.

The data stage decodes a JPEG at 1/2, 1/4 or 1/8 scale inside libjpeg (OpenCV
``IMREAD_REDUCED_COLOR_*``, ``align_ray/data/resizer.py``) and resizes only what is left.  The
reference is what img2dataset does: decode every pixel, then ``cv2.resize(..., INTER_AREA)``
to the target, then the same center crop.  For each picture this prints the PSNR (RGB, 8 bit)
of

* ``pixels``: our resized, cropped pixels before the JPEG encode, against the reference pixels
  (the decode path alone);
* ``output``: our delivered 256 px JPEG (``process_image``, quality ``jpeg_quality``), decoded,
  against the reference pixels (what a user gets);
* ``encode_only``: the reference pixels JPEG-encoded at the same quality and decoded, against
  themselves (what the re-encode alone costs, for scale).

Pictures: the download benchmark's (``python -m align_ray.web --photo-like``, seed 0, a pool of
128 pictures of 640-1024 px, JPEG quality 90), rendered in-process by the same code, plus a set
of larger ones (``--large-range``) where the 1/4 and 1/8 reductions are used.

    .venv/bin/python benchmarks/bench_decode_quality.py --json benchmarks/results/decode-quality-DATE.json
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from align_ray.data import resizer
from align_ray.data.config import DataConfig
from align_ray.web.store import ImageStore
from _bench_common import write_json  # the benchmarks folder is on sys.path: the script's own


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def reference(data: bytes, cfg: DataConfig, size: tuple[int, int]) -> np.ndarray:
    """Full decode, INTER_AREA resize to ``size`` (our resized width, height: the exact
    proportional size can differ by a pixel after a reduced decode), same crop as ours."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return resizer._frame(img, cfg)


def ours_pixels(data: bytes, cfg: DataConfig) -> tuple[np.ndarray, tuple[int, int], int]:
    """Our decode path up to the encode: DCT-reduced decode, rest of the resize, crop.
    Returns the pixels, the resized (width, height) before the crop, and the reduction."""
    w, h = Image.open(io.BytesIO(data)).size
    reduction = resizer._jpeg_reduction(w, h, cfg)
    scaled = resizer._scale(resizer._decode_jpeg(data, w, h, cfg), cfg)
    return resizer._frame(scaled, cfg), (scaled.shape[1], scaled.shape[0]), reduction


def measure(pictures: list[bytes], cfg: DataConfig) -> dict:
    rows = []
    for data in pictures:
        mine, size, reduction = ours_pixels(data, cfg)
        ref = reference(data, cfg, size)
        out = resizer.process_image(data, cfg)
        delivered = cv2.imdecode(np.frombuffer(out.jpg, np.uint8), cv2.IMREAD_COLOR)
        ok, enc = cv2.imencode(".jpg", ref, [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality])
        ref_jpeg = cv2.imdecode(enc, cv2.IMREAD_COLOR)
        assert mine.shape == ref.shape == delivered.shape, (mine.shape, ref.shape, delivered.shape)
        rows.append({"reduction": reduction, "pixels": psnr(mine, ref),
                     "output": psnr(delivered, ref), "encode_only": psnr(ref_jpeg, ref),
                     "max_abs_diff_pixels": int(np.abs(mine.astype(int) - ref.astype(int)).max())})

    def stats(key: str) -> dict:
        vals = [r[key] for r in rows]
        return {"median_db": round(statistics.median(vals), 2), "min_db": round(min(vals), 2),
                "mean_db": round(statistics.fmean(vals), 2)}

    return {"pictures": len(rows),
            "reductions": dict(sorted(Counter(r["reduction"] for r in rows).items())),
            "pixels": stats("pixels"), "output": stats("output"),
            "encode_only": stats("encode_only"),
            "max_abs_diff_pixels_median": statistics.median(r["max_abs_diff_pixels"] for r in rows),
            "per_picture": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
                            for r in rows]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool-size", type=int, default=128)
    p.add_argument("--image-size-range", type=int, nargs=2, default=(640, 1024))
    p.add_argument("--large-range", type=int, nargs=2, default=(1600, 3200),
                   help="native sides of the second set (0 0 = skip it)")
    p.add_argument("--large-count", type=int, default=32)
    p.add_argument("--sizes", type=int, nargs="+", default=[256], help="target image sizes")
    p.add_argument("--modes", nargs="+", default=["center_crop", "keep_ratio"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    t0 = time.time()
    sets = {"benchmark": ImageStore(args.seed, True, tuple(args.image_size_range), args.pool_size)}
    counts = {"benchmark": args.pool_size}
    if args.large_range[1] > 0:
        sets["large"] = ImageStore(args.seed, True, tuple(args.large_range), args.large_count)
        counts["large"] = args.large_count
    results = []
    for name, store in sets.items():
        pictures = [store.jpeg(i) for i in range(counts[name])]
        for size in args.sizes:
            for mode in args.modes:
                cfg = DataConfig(image_size=size, resize_mode=mode)
                res = measure(pictures, cfg)
                res.update(set=name, image_size=size, resize_mode=mode,
                           native_range=list(store.size_range), jpeg_quality=cfg.jpeg_quality)
                results.append(res)
                print(f"{name:<9} {size:>4} px {mode:<11} n={res['pictures']:<4} "
                      f"reductions {res['reductions']}  PSNR median/min dB: "
                      f"pixels {res['pixels']['median_db']:.1f}/{res['pixels']['min_db']:.1f}  "
                      f"output {res['output']['median_db']:.1f}/{res['output']['min_db']:.1f}  "
                      f"(encode alone {res['encode_only']['median_db']:.1f}/"
                      f"{res['encode_only']['min_db']:.1f})", flush=True)
    report = {"date": time.strftime("%Y-%m-%d"),
              "command": " ".join([Path(sys.executable).name, "benchmarks/bench_decode_quality.py",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "versions": {"opencv": cv2.__version__, "numpy": np.__version__},
              "reference": "cv2.imdecode IMREAD_COLOR + cv2.resize INTER_AREA + same crop",
              "seconds": round(time.time() - t0, 1), "results": results}
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
