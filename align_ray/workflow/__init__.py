"""The end-to-end workflow (``workflows/end_to_end.py``): data -> filter -> train -> evaluate ->
index -> serve, each stage the same code its CLI subcommand runs, plus a resumable stage driver
and an HTML report.  ``config`` (RunConfig, presets, YAML), ``web`` (the embedded noisy web),
``stages`` (run / skip each stage), ``serving`` (Serve + example queries), ``report``
(report.html), ``main`` (argument parsing and the run)."""
