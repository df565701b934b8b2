"""The layouts people train OPD on, read with the override lines README gives for each, templated as
conversations and graded by the math-verify pool end to end. Fixtures: tests/fixtures/datasets (the
exact schemas of GSM8K, MATH, DAPO-Math-17k and verl's preprocessed GSM8K parquet)."""

import json

import pytest

from megatron_opd.config import load_config
from megatron_opd.data.bundle import DataBundle
from megatron_opd.data.tokenizer import train_tokenizer
from mopd_testing import REPO_ROOT

RECIPE = REPO_ROOT / "configs" / "recipes" / "tiny_opd.yaml"
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "datasets"

# name: (file, README's override lines, a right response and a wrong one for the first record)
LAYOUTS = {
    "gsm8k": ("gsm8k.jsonl", ["data.prompt_key=question", "data.answer_key=answer"],
              "48 / 2 = 24 in May, so 48 + 24 = 72.\n#### 72", "#### 96"),
    "math": ("math.jsonl", ["data.prompt_key=problem", "data.answer_key=solution"],
             "x = 3, so the answer is $\\boxed{9}$.", "$\\boxed{3}$"),
    "dapo_math": ("dapo_math.parquet", ["data.prompt_key=prompt", "data.answer_key=reward_model.ground_truth"],
                  "Heron's formula with s = 21 gives sqrt(21*8*7*6).\nAnswer: 84", "Answer: 42"),
    "verl_gsm8k": ("verl_gsm8k.parquet", ["data.prompt_key=prompt", "data.answer_key=reward_model.ground_truth"],
                   "In May 24, so 72 in all.\n#### 72", "#### 24"),
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(path)
    return path


def _bundle(file, overrides, tok_dir, *extra):
    cfg = load_config(RECIPE, ["teachers=[{checkpoint: null}]", "data.synthetic=null",
                               f"data.train_path={FIXTURES / file}", "data.eval_holdout=1",
                               "rollout.max_model_len=4096", *overrides, *extra])
    return cfg, DataBundle(cfg, tok_dir)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_real_layout_loads_templates_and_grades(name, tok_dir):
    from transformers import AutoTokenizer

    from megatron_opd.rollout.engine import chat_prompt_ids

    file, overrides, right, wrong = LAYOUTS[name]
    cfg, bundle = _bundle(file, overrides, tok_dir)
    records = bundle.train.records + bundle.held_out
    assert len(records) == 3 and len(bundle.held_out) == 1
    first = records[0]
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if file.endswith(".parquet"):  # the prompt is the record's own conversation, used as it is
        assert first["prompt"][-1]["role"] == "user" and len(first["prompt"]) == 1
        ids = chat_prompt_ids(tok, [first["prompt"]], cfg.rollout)[0]
        assert tok.decode(ids).startswith("<|im_start|>user\n" + first["prompt"][0]["content"][:20])
    else:
        assert isinstance(first["prompt"], str) and "?" in first["prompt"]
    try:
        assert bundle.score([right, wrong], [first["answer"]] * 2) == [1.0, 0.0]
    finally:
        bundle._math_verifier.close()


def test_message_list_with_system_prompt_and_the_rules(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    from megatron_opd.data.dataset import load_records
    from megatron_opd.rollout.engine import chat_prompt_ids

    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": conv, "meta": {"gold": str(i)}}) + "\n" for i in range(3)))
    records = load_records(str(path), prompt_key="messages", answer_key="meta.gold")
    assert records[2] == {"prompt": conv, "answer": "2", "domain": "math"}
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    text = tok.decode(chat_prompt_ids(tok, [conv], load_config(RECIPE).rollout)[0])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
                    "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    # the record's own system message and data.system_prompt cannot both apply
    with pytest.raises(ValueError, match=r"data.system_prompt is set but 3 prompt\(s\) carry their own system"):
        _bundle(path, ["data.prompt_key=messages", "data.answer_key=meta.gold"], tok_dir, "data.system_prompt=Hi")

    bad = {"ends with the assistant": (conv[:3], r"record 0's data.prompt_key='messages' ends with a assistant "
                                                 r"message: the last message must be the user's"),
           "unknown role": ([{"role": "tool", "content": "x"}], r"needs a role in \('system', 'user', 'assistant'\)"),
           "number": (12345, r"record 0's data.prompt_key='messages' is int 12345, not text or a chat message list")}
    for what, (prompt, message) in bad.items():
        path.write_text(json.dumps({"messages": prompt, "meta": {"gold": "1"}}) + "\n")
        with pytest.raises(ValueError, match=message):
            load_records(str(path), prompt_key="messages", answer_key="meta.gold")
    path.write_text(json.dumps({"messages": "hi", "meta": {"other": "1"}}) + "\n")
    with pytest.raises(ValueError, match=r"record 0 has no 'meta.gold' \('gold' is missing\); fix the record or "
                                         r"data.answer_key"):
        load_records(str(path), prompt_key="messages", answer_key="meta.gold")
    with pytest.raises(ValueError, match=r"no field 'extra.gold' \(columns: \['messages', 'meta'\]\); set "
                                         r"data.answer_key \(a dotted path"):
        load_records(str(path), prompt_key="messages", answer_key="extra.gold")


def test_a_malformed_line_is_named_in_one_message(tmp_path):
    from megatron_opd.data.dataset import load_records

    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": 2\n{"prompt": "c", "answer": "3"}\n')
    with pytest.raises(ValueError, match=r"train.jsonl line 2 is not valid JSON \(Expecting ',' delimiter"):
        load_records(str(path))
    doc = tmp_path / "train.json"
    doc.write_text('[\n {"prompt": "a", "answer": "1"},\n {"prompt": "b" "answer": "2"}\n]\n')
    with pytest.raises(ValueError, match=r"train.json is not valid JSON at line 3, column 17"):
        load_records(str(doc))
