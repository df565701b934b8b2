"""DataBundle: where held-out prompts come from, stated in the config and never from training prompts."""

import json

import pytest

from megatron_opd.config import load_config
from megatron_opd.data.bundle import DataBundle
from megatron_opd.data.tokenizer import train_tokenizer
from mopd_testing import REPO_ROOT

RECIPE = REPO_ROOT / "configs" / "recipes" / "tiny_opd.yaml"


def _file_data(tmp_path, *extra):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(10)))
    return load_config(RECIPE, ["teachers=[{checkpoint: null}]", "data.synthetic=null",
                                f"data.train_path={path}", *extra])


def test_file_data_without_eval_path_must_say_where_held_out_prompts_come_from(tmp_path):
    with pytest.raises(ValueError, match=r"data.eval_path is unset.*data.eval_holdout=64"):
        _file_data(tmp_path)
    with pytest.raises(ValueError, match="data.eval_holdout applies only"):
        _file_data(tmp_path, "data.eval_holdout=3", f"data.eval_path={tmp_path / 'train.jsonl'}")


def test_eval_holdout_is_carved_out_of_training(tmp_path):
    train_tokenizer(tmp_path / "tok")
    bundle = DataBundle(_file_data(tmp_path, "data.eval_holdout=3"), tmp_path / "tok")
    held = [r["prompt"] for r in bundle.held_out]
    trained = [r["prompt"] for r in bundle.train.records]
    assert held == ["q7", "q8", "q9"] and trained == [f"q{i}" for i in range(7)]
    with pytest.raises(ValueError, match="data.eval_holdout=10 leaves no training prompts"):
        DataBundle(_file_data(tmp_path, "data.eval_holdout=10"), tmp_path / "tok")
