"""Stage 2: ALIGN's frequency filtering (work in progress: the per-pair rules and the
distributed distinct counts are here; applying the global rules with per-row reasons, the
rare-token vocabulary, eval-set near-duplicates, the report and `align-ray filter` are not yet)."""
