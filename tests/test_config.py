"""Recipe loading: where relative paths point."""

from pathlib import Path

from megatron_opd.config import load_config
from mopd_testing import REPO_ROOT


def test_recipe_spec_paths_are_relative_to_the_recipe_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO_ROOT / "configs" / "recipes" / "exopd_30b_a3b_to_1p7b.yaml")  # base: ..._to_4b
    assert Path(cfg.student.spec) == REPO_ROOT / "configs" / "models" / "qwen3_1p7b.yaml"  # its own
    assert Path(cfg.teachers[0].spec) == REPO_ROOT / "configs" / "models" / "qwen3_30b_a3b.yaml"  # from base
    # on the command line a path is the user's: relative to the working directory
    (tmp_path / "m.yaml").write_text((REPO_ROOT / "configs" / "models" / "qwen3_4b.yaml").read_text())
    cfg = load_config(REPO_ROOT / "configs" / "recipes" / "exopd_30b_a3b_to_4b.yaml", ["student.spec=m.yaml"])
    assert cfg.student.spec == "m.yaml"
