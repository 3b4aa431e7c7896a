"""A second real evaluation set: the dev set's own concepts drawn by other emoji artists.

Issue 13 is judged on "other emoji artists' drawings of the same concepts, and unseen concepts",
which the shared dev set (Google Noto only) cannot show. This builds the same rows in two other
art styles, from registry packages only (npm, sha256-pinned, as ``shared/data/build.sh`` does):

- **Twemoji** (``emoji-datasource-twitter``: Twitter's emoji, graphics CC-BY 4.0), 64 px PNGs;
- **OpenMoji** (``openmoji``: CC-BY-SA 4.0), SVGs rasterised with cairosvg (``pip install
  cairosvg``; skipped with a message when it is missing);
- **Fluent** (``fluentui-emoji``: Microsoft's Fluent UI emoji, MIT), its flat SVGs, also
  rasterised with cairosvg.  Its files are named by the emoji's CLDR name, not its code points,
  so a concept matches when its dev-set ``text`` slugs to a file name (most do; the rest are
  left out and counted).  Added as a third artist after the augmentation work had looked at
  the first two, so that work has one style it was not chosen on.

Every output row copies its caption columns (``text``, ``alt_text``, ``concept``, ``group``,
``dev_split``) from the dev-set row of the same concept, so a model is scored on the dev set's
val concepts (unseen concepts in an unseen style) and train concepts (seen concepts, unseen
style) with the same retrieval code (``align-ray eval --split-col dev_split``). Concepts the dev
set leaves out (its held-out evaluation groups) are never built: only concepts present in the dev
parquet are. Images are composited on white at 64 x 64, as the dev set's are.

    .venv/bin/python benchmarks/other_renderings.py            # -> benchmarks/data/emoji_*_dev.parquet

The images are not committed (licences, size); the script rebuilds them in about 20 s.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import DEV_SET, REPO  # noqa: E402

PACKAGES = {  # npm name -> (version, sha256 of the tarball `npm pack` fetches)
    "emoji-datasource-twitter": ("16.0.0",
                                 "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877"),
    "openmoji": ("17.0.0", "55ee7d13485dec86e9f38c1f3a645a13382d33ff97c0cd845ee824b0aef45e68"),
    "fluentui-emoji": ("1.3.0", "ec892e607e854859b812c7d827801756adc19955b0ef56d4ae8afcddd19492c5"),
}
CARRIED = ("text", "alt_text", "concept", "group", "dev_split", "category")
SIZE = 64


def norm_hex(h: str) -> str:
    """The dev set's concept key: upper-case code points joined by '-', without FE0F."""
    return "-".join(c for c in h.upper().replace("_", "-").split("-") if c and c != "FE0F")


def fetch(name: str, cache: Path) -> tarfile.TarFile:
    version, sha = PACKAGES[name]
    tgz = cache / f"{name}-{version}.tgz"
    if not tgz.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=cache, check=True,
                       stdout=subprocess.DEVNULL)
    got = hashlib.sha256(tgz.read_bytes()).hexdigest()
    if got != sha:
        raise SystemExit(f"{tgz}: sha256 {got}, expected {sha}")
    return tarfile.open(tgz)


def on_white(png_or_rgba) -> bytes:
    from PIL import Image

    im = png_or_rgba if isinstance(png_or_rgba, Image.Image) else Image.open(io.BytesIO(png_or_rgba))
    im = im.convert("RGBA")
    if im.size != (SIZE, SIZE):  # area resize, as the dev set's own pipeline would
        im = im.resize((SIZE, SIZE), Image.Resampling.BOX)
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    bg.alpha_composite(im)
    out = io.BytesIO()
    bg.convert("RGB").save(out, "PNG", optimize=True)
    return out.getvalue()


def members(tar: tarfile.TarFile, prefix: str, suffix: str, wanted: set[str]):
    """(concept key, member) for the package's images of the dev set's concepts only."""
    for m in tar.getmembers():
        if m.name.startswith(prefix) and m.name.endswith(suffix):
            key = norm_hex(m.name[len(prefix):-len(suffix)])
            if key in wanted:
                yield key, m


def twemoji(tar: tarfile.TarFile, wanted: set[str]) -> tuple[dict[str, bytes], list[str]]:
    return {k: on_white(tar.extractfile(m).read())
            for k, m in members(tar, "package/img/twitter/64/", ".png", wanted)}, []


def rasterise(style: str, tar: tarfile.TarFile, found) -> tuple[dict[str, bytes], list[str]]:
    """``found``: (concept key, SVG member) pairs, each rasterised with cairosvg at SIZE on white.
    A few SVGs use features cairosvg lacks (markers): reported, not guessed at."""
    try:
        import cairosvg
    except ImportError:
        print(f"{style} skipped: `pip install cairosvg` rasterises its SVGs", file=sys.stderr)
        return {}, []
    from PIL import Image

    out, failed = {}, []
    for k, m in found:
        try:
            png = cairosvg.svg2png(bytestring=tar.extractfile(m).read(), output_width=SIZE,
                                   output_height=SIZE)
        except Exception as e:  # noqa: BLE001 - any renderer failure drops that one image
            failed.append(f"{k}: {type(e).__name__}")
            continue
        out[k] = on_white(Image.open(io.BytesIO(png)))
    return out, failed


def openmoji(tar: tarfile.TarFile, wanted: set[str]) -> tuple[dict[str, bytes], list[str]]:
    return rasterise("openmoji", tar, members(tar, "package/color/svg/", ".svg", wanted))


def slug(name: str) -> str:
    """Fluent's file name for a CLDR name: lower case, runs of other characters -> '-'."""
    out = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(p for p in out.split("-") if p)


def fluent(tar: tarfile.TarFile, names: dict[str, str]) -> tuple[dict[str, bytes], list[str]]:
    """``names``: concept key -> dev-set text (the CLDR name)."""
    by_slug = {slug(text): key for key, text in names.items()}
    prefix = "package/icons/flat/"
    stems = ((m.name[len(prefix):-len(".svg")], m) for m in tar.getmembers()
             if m.name.startswith(prefix) and m.name.endswith(".svg"))
    return rasterise("fluent", tar, ((by_slug[s], m) for s, m in stems if s in by_slug))


def build(style: str, images: dict[str, bytes], dev: dict, dest: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = [c.removeprefix("emoji:") for c in dev["concept"]]
    idx = [i for i, k in enumerate(keys) if k in images]
    cols = {"image": [images[keys[i]] for i in idx],
            **{c: [dev[c][i] for i in idx] for c in CARRIED},
            "style": [style] * len(idx)}
    pq.write_table(pa.table(cols), dest)
    split = [dev["dev_split"][i] for i in idx]
    return {"style": style, "file": str(dest), "rows": len(idx),
            "train": split.count("train"), "val": split.count("val"),
            "dev_rows_without_image": len(keys) - len(idx)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dev", default=str(DEV_SET))
    ap.add_argument("--out", default=str(REPO / "benchmarks/data"))
    ap.add_argument("--cache", default=str(REPO / "benchmarks/data/npm"))
    args = ap.parse_args()
    import pyarrow.parquet as pq

    dev = pq.read_table(args.dev, columns=list(CARRIED)).to_pydict()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = {c.removeprefix("emoji:") for c in dev["concept"]}
    names = {c.removeprefix("emoji:"): t for c, t in zip(dev["concept"], dev["text"])}
    for style, name, render, arg in (("twemoji", "emoji-datasource-twitter", twemoji, wanted),
                                     ("openmoji", "openmoji", openmoji, wanted),
                                     ("fluent", "fluentui-emoji", fluent, names)):
        images, failed = render(fetch(name, Path(args.cache)), arg)
        if images:
            print({**build(style, images, dev, out / f"emoji_{style}_dev.parquet"),
                   "render_failed": failed})


if __name__ == "__main__":
    main()
