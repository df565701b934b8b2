"""megatron_opd/cross_tokenizer.py: span alignment on hand-built byte offsets, the teacher's view of a
sample under a genuinely different tokenizer (another vocabulary, merge list, special tokens and chat
template: `train_tokenizer(style="llama")`), and the map from the teacher's token log-probs back to the
student's positions."""

import pytest
import torch

from megatron_opd.cross_tokenizer import CrossTokenizer, TokenBytes, align_spans, cross_batch
from megatron_opd.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return (train_tokenizer(tmp_path_factory.mktemp("qwen")),
            train_tokenizer(tmp_path_factory.mktemp("llama"), style="llama"))


# ---- alignment on hand-built offsets (bytes per token)
@pytest.mark.parametrize("student, teacher, want_s, want_t, n", [
    ([1, 1, 1], [1, 1, 1], [0, 1, 2], [0, 1, 2], 3),            # identical: every span one token
    ([1, 1, 1], [3], [0, 0, 0], [0], 1),                        # the teacher merges three student tokens
    ([4], [1, 2, 1], [0], [0, 0, 0], 1),                        # the teacher splits one student token
    ([2, 1, 2], [1, 2, 2], [0, 0, 1], [0, 0, 1], 2),            # crossing boundaries: one span, then one-one
    ([1, 2, 3, 1], [3, 1, 2, 1], [0, 0, 1, 2], [0, 1, 1, 2], 3),  # merges on each side in turn
    ([2, 0, 2], [2, 2], [0, 0, 1], [0, 1], 2),                  # a zero-length token joins the span ending there
    ([2, 2, 1], [2, 2], [0, 1, -1], [0, 1], 2),                 # the student's text runs past the teacher's
    ([2, 3], [2, 2], [0, -1], [0, -1], 1),                      # a token straddles the common end: no span
    ([], [], [], [], 0),
])
def test_spans_close_exactly_where_both_tokenizations_have_a_boundary(student, teacher, want_s, want_t, n):
    assert align_spans(student, teacher) == (want_s, want_t, n)


def test_every_span_joins_the_same_bytes_on_both_sides(tokenizers):
    """Real tokenizations of one text: each span's student bytes equal its teacher bytes."""
    qwen, llama = tokenizers
    text = "Let me add: 47 + 385 = 432.  So  the answer is \\boxed{432}\n\ndone"
    ids_s, ids_t = qwen(text)["input_ids"], llama(text)["input_ids"]
    b_s, b_t = TokenBytes(qwen)(ids_s), TokenBytes(llama)(ids_t)
    assert b"".join(b_s) == b"".join(b_t) == text.encode()
    span_s, span_t, n = align_spans([len(x) for x in b_s], [len(x) for x in b_t])
    joined = [(b"".join(b for b, k in zip(b_s, span_s) if k == j), b"".join(b for b, k in zip(b_t, span_t) if k == j))
              for j in range(n)]
    assert all(a == b and a for a, b in joined)
    assert n < len(ids_s) and n < len(ids_t) + 1  # the tokenizers really differ (multi-token spans)
    # whitespace: the student's lone " " and the teacher's " 4" (space merged into the number) make one span
    assert b" 4" in [a for a, _ in joined] and b" " in b_s and b" 4" in b_t


# ---- the teacher's view of a sample
def test_view_renders_the_teachers_template_and_pairs_the_stop_token(tokenizers):
    qwen, llama = tokenizers
    cross = CrossTokenizer(qwen, llama)
    response = "47 + 385 = 432. The answer is \\boxed{432}"
    ids = qwen(response)["input_ids"] + [qwen.eos_token_id]  # "<|im_end|>": the student stopped
    v = cross.view("What is 47 + 385?", ids, stopped=True)
    assert llama.decode(v.prompt_ids) == ("<|start_header_id|>user<|end_header_id|>\n\nWhat is 47 + 385?<|eot_id|>"
                                          "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert v.response_ids[-1] == llama.convert_tokens_to_ids("<|eot_id|>")
    assert llama.decode(v.response_ids[:-1]) == response  # the text, re-tokenized by the teacher
    assert v.student_span[-1] == v.teacher_span[-1] == v.n_spans - 1  # stop <-> end of turn, a span of its own
    assert v.student_span.count(v.n_spans - 1) == v.teacher_span.count(v.n_spans - 1) == 1
    assert min(v.student_span) == 0 and min(v.teacher_span) == 0  # everything aligned


def test_view_of_a_response_cut_at_max_length(tokenizers):
    """Cut at the length cap: no end-of-turn; a cut inside a multi-byte character leaves the partial
    character's tokens without a span (they leave the loss); special tokens inside count as text."""
    qwen, llama = tokenizers
    cross = CrossTokenizer(qwen, llama)
    ids = qwen("sum = 12 é")["input_ids"]
    pieces = TokenBytes(qwen)(ids)
    assert pieces[-1] == "é".encode()[1:] and pieces[-2] == "é".encode()[:1]  # "é" is two byte tokens
    v = cross.view("q", ids[:-1], stopped=False)  # cut between the two bytes of "é"
    assert llama.decode(v.response_ids) == "sum = 12 "
    assert v.student_span[-1] == -1 and min(v.student_span[:-1]) == 0
    whole = cross.view("q", ids, stopped=False)
    assert min(whole.student_span) == 0 and llama.decode(whole.response_ids) == "sum = 12 é"
    # stopped=False with a special last token: not a stop, its text is the teacher's to tokenize
    special = cross.view("q", ids + [qwen.eos_token_id], stopped=False)
    assert llama.decode(special.response_ids).endswith("<|im_end|>")
    assert llama.convert_tokens_to_ids("<|eot_id|>") not in special.response_ids


def test_same_tokenizer_gives_one_token_spans_and_the_same_ids(tokenizers):
    qwen, _ = tokenizers
    cross = CrossTokenizer(qwen, qwen)
    assert cross.same_vocabulary()
    ids = qwen("47 + 385 = 432")["input_ids"] + [qwen.eos_token_id]
    v = cross.view("What is 47 + 385?", ids, stopped=True)
    assert v.response_ids == ids and v.n_spans == len(ids)
    assert v.student_span == v.teacher_span == list(range(len(ids)))
    assert qwen.decode(v.prompt_ids) == "<|im_start|>user\nWhat is 47 + 385?<|im_end|>\n<|im_start|>assistant\n"


def test_a_teacher_tokenizer_that_rewrites_the_text_leaves_that_sample_out(tokenizers):
    """A normalizer (here: lower-casing) makes the teacher's tokens spell another text: no offsets are
    shared, so the sample has no span at all (its tokens leave the loss) instead of a wrong alignment."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    qwen, llama = tokenizers
    backend = llama.backend_tokenizer.__class__.from_str(llama.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Lowercase()
    lowering = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|eot_id|>")
    lowering.chat_template = llama.chat_template
    cross = CrossTokenizer(qwen, lowering)
    ids = qwen("The answer is 12")["input_ids"] + [qwen.eos_token_id]
    v = cross.view("q", ids, stopped=True)
    assert v.student_span == [-1] * len(ids) and v.response_ids == [] and v.n_spans == 0
    assert min(cross.view("q", qwen("the answer is 12")["input_ids"], stopped=False).student_span) == 0


def test_non_byte_level_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(["a b c abc"] * 10, trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>"]))
    with pytest.raises(ValueError, match="not byte-level BPE"):
        TokenBytes(PreTrainedTokenizerFast(tokenizer_object=tok))


# ---- the teacher's log-probs at the student's positions
def test_each_student_token_gets_its_share_of_its_spans_teacher_logprob(tokenizers):
    """Two rows by hand: the student's prompt lengths 3 and 2, the teacher's 4 and 5."""
    from megatron_opd.cross_tokenizer import TeacherView

    views = [TeacherView(prompt_ids=[1, 1, 1, 1], response_ids=[5, 6, 7], student_span=[0, 0, 1, 1, 1],
                         teacher_span=[0, 1, 1], n_spans=2),
             TeacherView(prompt_ids=[1, 1, 1, 1, 1], response_ids=[5, 6], student_span=[0, -1],
                         teacher_span=[0, -1], n_spans=1)]
    cb = cross_batch(views, student_prompt_lengths=[3, 2], student_width=9, pad_id=0)
    assert cb.input_ids.shape == (2, 7) and cb.response_tokens == 4
    lp_t = torch.zeros(2, 6)
    lp_t[0, 3:6] = torch.tensor([-1.0, -2.0, -4.0])  # row 0's teacher tokens predicted at positions 3..5
    lp_t[1, 4] = -3.0
    lp_t[1, 5] = -100.0  # a teacher token without a span: not scored (mask 0), never reaches the student
    got = cb.to_student(lp_t)
    want = torch.zeros(2, 8)
    want[0, 2:7] = torch.tensor([-0.5, -0.5, -2.0, -2.0, -2.0])  # span 0 = -1 over 2; span 1 = -6 over 3
    want[1, 1] = -3.0
    assert torch.equal(got, want)
    assert cb.mask[1].tolist() == [0, 0, 0, 0, 1, 0]
    # each span's student values sum to the teacher's log-prob of that span (the chain rule)
    assert got[0, 2:4].sum() == -1.0 and got[0, 4:7].sum() == -6.0


def test_a_spans_teacher_logprob_is_shared_by_the_students_surprisal(tokenizers):
    """With the sampling log-probs the span's teacher log-prob goes to the tokens the student chose: a
    span of four student tokens whose last three were forced (log-prob ~0) charges the first; the shares
    still sum to 1 per span (the span's log-ratio stays exact)."""
    from megatron_opd.cross_tokenizer import SURPRISAL_EPS, TeacherView

    view = TeacherView(prompt_ids=[1, 1], response_ids=[5, 6], student_span=[0, 0, 0, 0, 1], teacher_span=[0, 1],
                       n_spans=2)
    lp_s = torch.zeros(1, 7)
    lp_s[0, 1:6] = torch.tensor([-1.2, 0.0, -0.0005, 0.0, -0.3])  # the student's 5 tokens at positions 1..5
    cb = cross_batch([view], student_prompt_lengths=[2], student_width=8, pad_id=0, student_logprobs=lp_s)
    surprisal = torch.tensor([1.2, 0.0, 0.0005, 0.0]) + SURPRISAL_EPS
    assert torch.allclose(cb.student_share[0, 1:5], surprisal / surprisal.sum())
    assert cb.student_share[0, 1] > 0.99 and cb.student_share[0, 5] == 1.0
    lp_t = torch.zeros(1, 3)
    lp_t[0, 1], lp_t[0, 2] = -14.0, -0.5  # the teacher's two tokens
    got = cb.to_student(lp_t)[0]
    assert torch.isclose(got[1:5].sum(), torch.tensor(-14.0)) and got[1] < -13.9 and got[5] == -0.5
