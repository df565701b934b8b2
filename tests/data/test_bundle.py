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


def test_empty_data_file_is_one_message_naming_the_file(tmp_path):
    from megatron_opd.data.dataset import load_records

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty.jsonl is empty: it needs one record per line with 'prompt'"):
        load_records(str(tmp_path / "empty.jsonl"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"blank.jsonl is empty"):
        load_records(str(tmp_path / "blank.jsonl"))


def test_prompt_longer_than_max_model_len_is_refused_before_any_engine(tmp_path):
    """vLLM used to refuse it only at the first rollout; the chat template's tokens count too."""
    from transformers import AutoTokenizer

    from megatron_opd.rollout.engine import chat_prompt_ids

    train_tokenizer(tmp_path / "tok")
    path = tmp_path / "train.jsonl"
    long = "Compute " + " + ".join(str(i) for i in range(40))
    rows = [{"prompt": f"q{i}", "answer": "1"} for i in range(5)] + [{"prompt": long, "answer": "1"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(RECIPE, ["teachers=[{checkpoint: null}]", "data.synthetic=null",
                               f"data.train_path={path}", "data.eval_holdout=1"])  # the long one is held out
    need = len(chat_prompt_ids(AutoTokenizer.from_pretrained(str(tmp_path / "tok")), [long], cfg.rollout)[0])
    assert need > cfg.rollout.max_model_len  # 64 in tiny_opd.yaml
    with pytest.raises(ValueError, match=rf"held-out prompts: 1 prompt\(s\) leave no room.*max_model_len=64 "
                                         rf"\(prompt 0 has {need} tokens after the chat template"):
        DataBundle(cfg, tmp_path / "tok")
    cfg.rollout.max_model_len = need + 1
    DataBundle(cfg, tmp_path / "tok")  # fits now


def test_multi_teacher_domain_without_a_teacher_is_refused_before_models_start(tmp_path):
    train_tokenizer(tmp_path / "tok")
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": f"q{i}", "answer": "1", "domain": d} for i, d in enumerate(["math", "code", "chem"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teachers = "teachers=[{checkpoint: null, domain: math}, {checkpoint: null, domain: code}]"
    cfg = load_config(RECIPE, [teachers, "data.synthetic=null", f"data.train_path={path}",
                               f"data.eval_path={path}"])
    with pytest.raises(ValueError, match=r"data.train_path: 1 prompt\(s\) have domain\(s\) \['chem'\] that no "
                                         r"teacher serves"):
        DataBundle(cfg, tmp_path / "tok")


def test_a_prompt_field_that_is_not_text_is_refused_naming_the_field(tmp_path):
    """A data.prompt_key naming a number column (an id) used to train on "12345"-style prompts."""
    import json

    from megatron_opd.data.dataset import load_records

    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"id": 12345 + i, "question": f"{i}+1?", "answer": i + 1}) + "\n"
                            for i in range(3)))
    with pytest.raises(ValueError, match=r"data.prompt_key='id' is int 12345, not text"):
        load_records(str(path), prompt_key="id")
    records = load_records(str(path), prompt_key="question")
    assert records[0] == {"prompt": "0+1?", "answer": "1", "domain": "math"}  # numeric answers are fine

