"""Stage 2: ALIGN's frequency filtering of a download-stage output (``align-ray filter``).

rules.py (per-pair rules, tokenisation) · counts.py (distinct counts) · vocab.py (rare tokens) ·
evalset.py (eval-set near-duplicates) · plan.py (the global Ray Data plan -> one verdict per
row) · writer.py (per-shard output) · report.py · safety.py (optional hook) · pipeline.py.
"""
