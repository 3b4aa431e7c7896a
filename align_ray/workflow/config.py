"""``RunConfig``: one run of the workflow = an output root + one typed config per stage.

A run YAML (``--config run.yaml``) has the stage sections ``data``, ``filter``, ``train``,
``index``, ``serve`` (each exactly the stage's own config: ``align-ray <stage> --config``), and
optionally ``output`` (the root), ``web`` (the embedded noisy web, used when ``data.input`` is
empty), ``queries`` and ``top_k`` (the example searches of the serve stage and the report), and
``bootstrap`` (round 2: :class:`BootstrapConfig`).  Unknown keys are an error at every level.

Precedence: stage defaults < preset (``default`` / ``smoke``; only without ``--config`` or with
``--smoke``) < YAML < command-line flags.  Locations left empty are chained from the root::

    data.output   = ROOT/data            filter.input = data.output   filter.output = ROOT/filtered
    train.data    = [filter.output]      train.output = ROOT/train
    index.model   = train.output/model   index.data   = filter.output index.output  = ROOT/index
    serve.model   = index.model          serve.index  = index.output

With ``bootstrap.enabled`` (round 2; R2 = ``bootstrap.output``, default ROOT/round2)::

    bootstrap.score.model  = train.output/model   .input = data.output   .output = R2/scored
      (folds >= 2: .fold_models = [R2/fold0/model, ...], trained by the folds stage)
    bootstrap.filter       = the filter section + bootstrap.filter   .input = R2/scored
                                                                     .output = R2/filtered
    bootstrap.train        = the train section + bootstrap.train     .data = [R2/filtered]
                                                                     .output = R2/train
    index.model  = R2/train/model        index.data = R2/filtered   (the round-2 model serves)
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align_ray import config as config_lib
from align_ray import storage
from align_ray.data.config import DataConfig
from align_ray.filter.config import FilterConfig
from align_ray.score.config import ScoreConfig
from align_ray.serve.config import IndexConfig, ServeConfig
from align_ray.train.config import TrainConfig

STAGES = ("data", "filter", "train", "eval", "folds", "score", "filter2", "train2", "eval2",
          "index", "serve")
ROUND2_STAGES = ("folds", "score", "filter2", "train2", "eval2")   # only with bootstrap.enabled
SECTIONS = ("data", "filter", "train", "index", "serve")
TOP_LEVEL = ("output", "web", "queries", "top_k", "bootstrap", *SECTIONS)
DEFAULT_QUERIES = ["three red circles on a blue background", "a yellow star at the top",
                   "two green squares on the left", "a photo of black triangles in the center"]


@dataclass
class WebConfig:
    """The built-in noisy web (align_ray.web) that the embedded run downloads from."""

    rows: int = 1000                 # URLs in the list it writes (ROOT/urls.parquet)
    seed: int = 0
    noise: bool = True               # ALIGN-style alt-text and image noise
    fault_fraction: float = 0.02     # share of transport/decoding-fault URLs
    host: str = "127.0.0.1"
    port: int = 0                    # 0 = a free port (remembered in ROOT/web.json for resume)


# Round 2's filter when bootstrap.filter sets no score rule: the round-1 model's top 70 % of the
# raw rows by pair_score, on top of the frequency rules (DataComp's "basic ∩ CLIP score").
DEFAULT_ROUND2_FILTER: dict[str, Any] = {"score_keep_fraction": 0.7}
# what round 2 never inherits from round 1's sections: its own locations (chained under R2)
_LOCATIONS = {"filter": ("input", "output"), "train": ("data", "output", "storage_path")}


@dataclass
class BootstrapConfig:
    """Round 2 (off by default): ALIGN's frequency rules, then a model-based filter.

    The round-1 model scores every row the data stage produced (``align-ray score``), the filter
    runs again over them with round 1's rules plus a score rule (``filter``: overrides on top of
    the filter section), and round 2 trains with round 1's train section (``train``: overrides),
    so with no overrides both rounds see the same number of training samples.  ``eval2``
    evaluates *both* models on round 1's held-out rows, the one set neither trained on (round 2's
    own validation split is the subset of it that its score filter kept, easier by design).

    ``folds`` >= 2 cross-fits the scores: the ``folds`` stage trains that many extra round-1
    models, model i on round 1's training rows minus caption-hash fold i (``train.folds`` /
    ``train.fold``), and each row is scored by the model that never saw it (``score.fold_models``).
    A model that trained on a pair for several epochs scores it high whether it is right or not;
    it costs ``folds`` more round-1 trainings.  0: the round-1 model scores every row.

    ``score.model`` set to another model (any that ``align-ray score`` takes: one trained on other
    data, a Hugging Face CLIP) scores instead of round 1's, as DataComp filters with a CLIP
    trained elsewhere.
    """

    enabled: bool = False
    output: str = ""                     # "" = ROOT/round2
    folds: int = 0
    score: ScoreConfig = field(default_factory=ScoreConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class RunConfig:
    output: str = "out/end-to-end"
    web: WebConfig = field(default_factory=WebConfig)
    queries: list[str] = field(default_factory=lambda: list(DEFAULT_QUERIES))
    top_k: int = 6
    data: DataConfig = field(default_factory=DataConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)

    @property
    def embedded(self) -> bool:
        """True when the data stage downloads from the built-in noisy web."""
        return not self.data.input


# What the embedded noisy web needs from the download stage whatever the preset: it lives on
# 127.0.0.1 (so the SSRF guard must allow loopback), one fault URL resolves "internal.test" to a
# private address (which must stay blocked), and its fault URLs would otherwise wait 20 s each.
# It is one host standing in for a whole web, so the per-host cap (max_per_host, 4 by default:
# polite to a real site) would hold every actor to 4 downloads; it gets the actor's full width.
EMBEDDED_DATA = {"allow_cidr": ["127.0.0.0/8"], "resolve": {"internal.test": "10.0.0.1"},
                 "extra_cols": ["noise", "fault"], "timeout_read": 5.0, "timeout_total": 10.0,
                 "retries": 1, "max_per_host": 64}

PRESETS: dict[str, dict[str, Any]] = {
    # no arguments: every stage on a tiny model, < 10 min on a 2-core box (measured: see README)
    "default": {
        "output": "out/end-to-end",
        "web": {"rows": 3000},
        "data": {"image_size": 96, "shard_size": 500, "write_webdataset": False},
        "filter": {"write_webdataset": False},
        # AdamW 2e-3: the tiny model learns in 150 steps (LAMB 1e-3 barely moved: loss 3.35
        # and R@1 at chance after 100 steps).  Batch 64 per worker, not 16: measured on the same
        # 1,322 filtered rows, 150 x 64 gave held-out R@1 11-32x chance (2 seeds) where 300 x 16
        # gave 3-13x (BatchNorm statistics and negatives both need the batch).  No flip: the
        # noisy web's captions say "on the left" / "on the right".
        # grad_clip / crop_scale pinned: the held-out figures README quotes for this preset were
        # measured with them (TrainConfig's own defaults changed to the plain-loop recipe since)
        "train": {"workers": 2, "batch_size": 64, "steps": 150, "warmup_steps": 10,
                  "optimizer": "adamw", "lr": 0.002, "checkpoint_every": 50, "hflip": 0.0,
                  "grad_clip": 1.0, "crop_scale": [0.5, 1.0],
                  "log_every": 10, "val_fraction": 0.15, "data_workers": 1, "shuffle_buffer": 256,
                  "eval_batch_size": 64,
                  "model": {"preset": "tiny", "vocab_size": 2000, "max_length": 32}},
        "index": {"concurrency": 1, "batch_size": 64, "thumb_size": 128},
        "serve": {"image_encoder": {"max_replicas": 1, "num_cpus": 0.25},
                  "text_encoder": {"max_replicas": 1, "num_cpus": 0.25},
                  "router": {"num_cpus": 0.25}},
    },
    # --smoke: the same chain, smaller everywhere (CI, the job-submission test)
    "smoke": {
        "output": "out/smoke",
        "web": {"rows": 300},
        "data": {"image_size": 64, "shard_size": 100, "write_webdataset": False},
        "filter": {"write_webdataset": False},
        "train": {"workers": 2, "batch_size": 8, "steps": 8, "warmup_steps": 2,
                  "checkpoint_every": 4, "log_every": 2, "val_fraction": 0.2,
                  "data_workers": 1, "shuffle_buffer": 16, "eval_batch_size": 32,
                  "model": {"preset": "tiny", "embed_dim": 64, "vocab_size": 1000,
                            "max_length": 32}},
        "index": {"concurrency": 1, "batch_size": 32, "thumb_size": 96},
        "serve": {"image_encoder": {"max_replicas": 1, "num_cpus": 0.25},
                  "text_encoder": {"max_replicas": 1, "num_cpus": 0.25},
                  "router": {"num_cpus": 0.25}},
        "queries": DEFAULT_QUERIES[:2],
        "top_k": 4,
    },
}


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``top`` wins); lists and scalars are replaced whole."""
    out = copy.deepcopy(base)
    for k, v in (top or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "resolve":
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    data = yaml.safe_load(storage.read_text(path)) or {}   # a local path or an s3:// URI
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with sections {list(TOP_LEVEL)}")
    return data


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _chain(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill every empty location from the output root and the previous stage's output."""
    root = raw["output"] = str(raw.get("output") or RunConfig.output)
    d, f, t = raw.setdefault("data", {}), raw.setdefault("filter", {}), raw.setdefault("train", {})
    i, s = raw.setdefault("index", {}), raw.setdefault("serve", {})
    d["output"] = d.get("output") or _join(root, "data")
    f["input"] = f.get("input") or d["output"]
    f["output"] = f.get("output") or _join(root, "filtered")
    t["data"] = t.get("data") or [f["output"]]
    t["output"] = t.get("output") or _join(root, "train")
    b = raw.setdefault("bootstrap", {})
    if b.get("enabled"):
        _chain_round2(raw, b)
        i["model"] = i.get("model") or _join(b["train"]["output"], "model")
        i["data"] = i.get("data") or b["filter"]["output"]
    i["model"] = i.get("model") or _join(t["output"], "model")
    i["data"] = i.get("data") or f["output"]
    i["output"] = i.get("output") or _join(root, "index")
    s["model"] = s.get("model") or i["model"]
    s["index"] = s.get("index") or i["output"]
    return raw


def _chain_round2(raw: dict[str, Any], b: dict[str, Any]) -> None:
    """Round 2's sections: round 1's, overridden by bootstrap's own, located under R2."""
    r2 = b["output"] = str(b.get("output") or _join(raw["output"], "round2"))
    for name in ("filter", "train"):
        base = {k: v for k, v in raw[name].items() if k not in _LOCATIONS[name]}
        over = dict(b.get(name) or {})
        if name == "filter" and not any(over.get(k) is not None for k in
                                        ("score_min", "score_keep_fraction")):
            base = _merge(base, DEFAULT_ROUND2_FILTER) if not over.get("semdedup") else base
        b[name] = _merge(base, over)
    sc = b.setdefault("score", {})
    if int(b.get("folds") or 0) >= 2:
        sc["fold_models"] = sc.get("fold_models") or [
            _join(_join(r2, f"fold{i}"), "model") for i in range(int(b["folds"]))]
    elif not sc.get("fold_models"):
        sc["model"] = sc.get("model") or _join(raw["train"]["output"], "model")
    sc["input"] = sc.get("input") or raw["data"]["output"]
    sc["output"] = sc.get("output") or _join(r2, "scored")
    b["filter"]["input"] = b["filter"].get("input") or sc["output"]
    b["filter"]["output"] = b["filter"].get("output") or _join(r2, "filtered")
    b["train"]["data"] = b["train"].get("data") or [b["filter"]["output"]]
    b["train"]["output"] = b["train"].get("output") or _join(r2, "train")
    # one Ray Train run name per round: a shared storage_path must not mix their checkpoints
    b["train"]["name"] = b["train"].get("name") or f"{raw['train'].get('name', 'align')}-round2"


def build(raw: dict[str, Any]) -> RunConfig:
    """A RunConfig from a merged mapping (sections as dicts); chains locations first."""
    config_lib.check_mappings(RunConfig, raw, "run config")
    raw = _chain(copy.deepcopy(raw))
    if not raw["data"].get("input"):
        raw["data"] = _merge(EMBEDDED_DATA, raw["data"])
        raw["data"]["input"] = ""
    return config_lib.from_dict(RunConfig, raw, source="run config")


def load(config: str | Path | None = None, *, smoke: bool = False,
         overrides: dict[str, Any] | None = None) -> RunConfig:
    """Preset (``smoke``, or ``default`` when no YAML is given) < YAML < ``overrides``."""
    raw: dict[str, Any] = {}
    if smoke:
        raw = copy.deepcopy(PRESETS["smoke"])
    elif config is None:
        raw = copy.deepcopy(PRESETS["default"])
    if config is not None:
        raw = _merge(raw, read_yaml(config))
    return build(_merge(raw, overrides or {}))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out["serve"] = cfg.serve.to_dict()
    if not cfg.bootstrap.enabled:   # round 2's derived sections only say something when on
        out["bootstrap"] = {"enabled": False}
    return out
