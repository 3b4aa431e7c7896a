"""FilterConfig: every knob of ALIGN's frequency filtering (``align-ray filter``).

Defaults are the paper's (ALIGN, Jia et al. 2021, §3).  Interpretation choices, written down:

* All global counts are taken over the *raw* corpus = every row the download stage produced,
  before any rule drops anything (the paper computes its statistics "from the raw dataset").
* "Image" = exact sha256 of the downloaded bytes (``image_identity: sha256``); ``phash`` makes
  near-identical re-encodings the same image for the texts-per-image count and the duplicates.
* Rare tokens: the vocabulary is the ``vocab_size`` most frequent unigrams + bigrams of the raw
  corpus (ties at the cut are excluded, never broken arbitrarily), and only grams seen at least
  ``min_token_count`` times are in it.  A text is dropped when one of its *unigrams* is outside
  the vocabulary (``check_bigrams: true`` also checks its bigrams; on small corpora most bigrams
  are seen once, which would drop nearly everything).
* Exact duplicates (same image, same normalised text) collapse to the row with the smallest key.
* CLIP-score filtering (needs a ``pair_score`` column: run ``align-ray score`` first) is off
  until a value is set.  ``score_min`` keeps pairs with ``pair_score >= score_min``;
  ``score_keep_fraction`` keeps the ceil(fraction x N) best-scoring of the N raw rows, an exact
  global cut (ties broken by the smaller key, :mod:`align_ray.filter.quantile`).  Both come
  after the frequency rules, so a row another rule drops keeps that reason; with those rules
  on, fewer than ceil(fraction x N) rows may survive (DataComp's "basic ∩ CLIP score").
* SemDeDup (``semdedup: true``, off by default; needs ``image_embedding`` + ``pair_score``
  from ``align-ray score``): k-means over the image embeddings of the rows every other rule
  kept, then inside each cluster a pair whose image cosine to a kept pair is > 1 - eps is
  dropped (``semantic_duplicate``), the highest ``pair_score`` kept (ties: smaller key).
  ``eps`` is a cosine *distance*, as in the paper (:mod:`align_ray.filter.semdedup`).
* Near-duplicate images (``near_dup_distance: d``, off until set): an image (all its rows) is
  dropped when another image within d bits of pHash Hamming distance has a smaller first key
  (``near_duplicate``), over the whole raw corpus, found by the pigeonhole rule on d + 1 pHash
  bands (:mod:`align_ray.filter.neardup`).
* MetaCLIP balancing (``balance_entries``: a file of concepts, off until set): a pair is kept
  when an entry its caption contains selects it; entries with more than ``balance_cap`` pairs
  select each with probability cap / count, pairs matching no entry are dropped
  (``metaclip_balance``, :mod:`align_ray.filter.balance`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

RULES = ("image_too_small", "aspect_ratio", "too_few_tokens", "too_many_tokens",
         "eval_near_duplicate", "image_too_many_texts", "text_too_many_images", "rare_token",
         "exact_duplicate", "near_duplicate", "metaclip_balance", "score_min", "score_keep_fraction",
         "semantic_duplicate", "unsafe")
SCORE_RULES = ("score_min", "score_keep_fraction")   # on only with a value (the field of that name)
IMAGE_IDENTITIES = ("sha256", "phash")  # exact bytes, or near-identical re-encodings too


@dataclass
class FilterConfig:
    input: str = ""                       # a download-stage output folder (local or s3://)
    output: str = ""                      # same layout as the download stage
    # per-pair rules (on original image dimensions)
    min_side: int = 200                   # keep if shorter side > min_side
    max_aspect: float = 3.0               # keep if long side / short side < max_aspect
    min_tokens: int = 3                   # keep if min_tokens <= unigrams <= max_tokens
    max_tokens: int = 20
    # global rules
    image_identity: str = field(default="sha256", metadata={"choices": IMAGE_IDENTITIES})  # phash: re-encodings are one
    max_texts_per_image: int = 1000       # drop images with more distinct alt-texts
    max_images_per_text: int = 10         # drop alt-texts shared by more distinct images
    vocab_size: int = 100_000_000         # ALIGN: top 100 M unigrams + bigrams
    min_token_count: int = 2              # a gram seen fewer times is never in the vocabulary
    check_bigrams: bool = False
    dedup: bool = True                    # collapse exact duplicates
    eval_sets: list[str] = field(default_factory=list)   # parquet files/folders with images
    eval_image_col: str = ""              # "" = first of jpg / image / img present
    eval_max_distance: int = 8            # pHash Hamming distance counted as a near-duplicate
    disabled_rules: list[str] = field(default_factory=list,
                                      metadata={"choices": RULES, "help": "turn a rule off (repeatable)"})
    # CLIP-score rules on the pair_score column (`align-ray score`); None: off
    score_min: float | None = None        # keep pairs with pair_score >= score_min
    score_keep_fraction: float | None = None  # keep the top fraction of all rows by pair_score
    # SemDeDup on the score stage's image embeddings (semdedup.py); off: it needs `align-ray
    # score` first and costs a k-means plus an all-pairs pass inside every cluster
    semdedup: bool = False               # SemDeDup on image embeddings (needs `align-ray score`)
    semdedup_clusters: int = 0            # k-means k; 0 = one cluster per ~10 k rows (the paper's ratio)
    semdedup_eps: float = 0.05            # cosine distance: drop when cosine > 1 - eps to a kept pair
    semdedup_train_rows: int = 200_000    # k-means start: faiss on a key-hash sample of this many rows
    semdedup_kmeans_passes: int = 5       # Lloyd passes over every row after that start (kmeans.py); 0 = none
    # near-duplicate images across the corpus (neardup.py); None = off
    near_dup_distance: int | None = None  # pHash bits two images may differ in and be near-duplicates
    # MetaCLIP-style balancing (balance.py); "" = off
    balance_entries: str = ""             # text file of concepts, one per line (local or s3://)
    balance_cap: int = 20_000             # pairs kept per entry (MetaCLIP's t)
    balance_seed: int = 0                 # the deterministic per-(key, entry) draws
    # optional per-row safety hook "package.module:function" (off by default; see safety.py)
    safety_hook: str = ""
    # execution
    num_partitions: int = 0               # shuffle partitions; 0 = from the data size
    write_parquet: bool = True
    write_webdataset: bool = True
    report: bool = True
    report_top: int = 20
    overwrite: bool = False
    # fail (exit 3, naming the stuck operator) after this long without progress; <= 0: never
    stall_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.image_identity not in IMAGE_IDENTITIES:
            raise ValueError(f"image_identity must be sha256 or phash, not {self.image_identity!r}")
        unknown = sorted(set(self.disabled_rules) - set(RULES))
        if unknown:
            raise ValueError(f"disabled_rules: unknown rule(s) {unknown}; rules: {list(RULES)}")
        if self.score_keep_fraction is not None and not 0 <= self.score_keep_fraction <= 1:
            raise ValueError(f"score_keep_fraction must be in [0, 1], not {self.score_keep_fraction}")
        if (not 0 <= self.semdedup_eps < 1 or self.semdedup_clusters < 0
                or self.semdedup_train_rows < 1 or self.semdedup_kmeans_passes < 0):
            raise ValueError("semdedup_eps must be in [0, 1), semdedup_clusters >= 0, "
                             "semdedup_train_rows >= 1 and semdedup_kmeans_passes >= 0")
        if self.near_dup_distance is not None and not 0 <= self.near_dup_distance <= 16:
            raise ValueError(f"near_dup_distance must be in 0..16 (pHash bits), not "
                             f"{self.near_dup_distance}")
        if self.balance_cap < 1:
            raise ValueError(f"balance_cap must be >= 1, not {self.balance_cap}")

    def enabled(self, rule: str) -> bool:
        if rule in SCORE_RULES and getattr(self, rule) is None:
            return False
        if rule == "semantic_duplicate" and not self.semdedup:
            return False
        if rule == "near_duplicate" and self.near_dup_distance is None:
            return False
        if rule == "metaclip_balance" and not self.balance_entries:
            return False
        return rule not in self.disabled_rules

    def needs_score(self) -> bool:
        return any(self.enabled(r) for r in SCORE_RULES)
