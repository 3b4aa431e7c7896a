"""ray_env: a local Ray start must not make Ray probe cloud metadata addresses."""

from __future__ import annotations

from pathlib import Path

from align_ray.ray_env import sandbox_home


def test_sandbox_home_says_local_and_keeps_the_real_home_reachable(tmp_path):
    real = tmp_path / "home"
    (real / ".aws").mkdir(parents=True)
    (real / ".aws" / "credentials").write_text("[default]\n")
    home = Path(sandbox_home(str(real)))
    assert "type: local" in (home / "ray_bootstrap_config.yaml").read_text()
    assert (home / ".aws" / "credentials").read_text() == "[default]\n"
    assert sandbox_home(str(real)) == str(home)  # idempotent


def _ops(ds) -> list[str]:
    """The logical operators of a dataset's plan, last first."""
    out, op = [], ds._logical_plan.dag
    while op is not None:
        out.append(op.name)
        op = op.input_dependencies[0] if op.input_dependencies else None
    return out


def test_read_parquet_uses_the_v1_datasource_and_reads_the_same_rows(ray_cluster, tmp_path,
                                                                    monkeypatch):
    """The plan has no ListFiles operator (Ray 2.60's V2 chain); the rows and the
    ``include_paths`` column equal V2's, in file order; the context flag is left as it was; a
    user's explicit RAY_DATA_USE_DATASOURCE_V2 wins."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    from align_ray.ray_env import read_parquet

    for i in range(3):
        pq.write_table(pa.table({"k": list(range(i * 50, i * 50 + 50)), "t": ["x"] * 50}),
                       tmp_path / f"part-{i}.parquet", row_group_size=20)
    files = sorted(str(p) for p in tmp_path.glob("*.parquet"))
    ctx = ray.data.DataContext.get_current()
    monkeypatch.delenv("RAY_DATA_USE_DATASOURCE_V2", raising=False)
    assert ctx.use_datasource_v2                       # Ray's default, left alone
    # set before the datasets exist: each copies the context when it is created (set after,
    # the order held on a quiet box and not on a loaded one)
    ctx.execution_options.preserve_order = True
    try:
        ours = read_parquet(files, columns=["k"], include_paths=True)
        assert _ops(ours) == ["ReadParquet"]
        assert ctx.use_datasource_v2
        v2 = ray.data.read_parquet(files, columns=["k"], include_paths=True)
        assert "ListFiles" in _ops(v2)
        a, b = ours.take_all(), v2.take_all()
    finally:
        ctx.execution_options.preserve_order = False
    # the same rows and paths as V2 (whose order is not what is tested here); ours in order
    assert sorted((r["k"], r["path"]) for r in a) == sorted((r["k"], r["path"]) for r in b)
    assert [(r["k"], r["path"]) for r in a] == [(k, files[k // 50]) for k in range(150)]

    monkeypatch.setenv("RAY_DATA_USE_DATASOURCE_V2", "1")
    assert "ListFiles" in _ops(read_parquet(files))
