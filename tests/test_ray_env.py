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
