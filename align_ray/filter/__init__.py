"""Stage 2: ALIGN's frequency filtering (work in progress: the per-row rules are here; the
global, distributed rules and the `align-ray filter` command are not yet)."""
