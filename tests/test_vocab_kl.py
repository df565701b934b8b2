"""Exact full-vocabulary (and top-k) KL, vocabulary-parallel: values and gradients against a dense
float64 reference, TP=2 against TP=1, and peak temporaries bounded by the chunk, not by tokens x V."""

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_opd.vocab_kl import vocab_parallel_kl, vocab_parallel_kl_and_logprobs
from mopd_testing import coarsen_to_top_k, run_ranks


def dense_kl(h_s, w_s, h_t, w_t, valid, direction, top_k=None):
    """log_softmax of the full logits in float64, KL summed over the vocabulary (top-k: over the teacher's
    top-k tokens and one tail bucket of the rest of each model's mass)."""
    z_s = (h_s.double() @ w_s.double().t())[:, :valid]
    z_t = (h_t.double() @ w_t.double().t())[:, :valid]
    ls, lt = z_s.log_softmax(-1), z_t.log_softmax(-1)
    if top_k is not None:
        ls, lt = coarsen_to_top_k(ls, lt, top_k)
    log_p, log_q = (ls, lt) if direction == "reverse" else (lt, ls)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def inputs(n=11, h_s=8, h_t=12, vpad=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, h_s, generator=g), torch.randn(vpad, h_s, generator=g) * 0.7,
            torch.randn(n, h_t, generator=g), torch.randn(vpad, h_t, generator=g) * 0.7)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("chunk", [3, 64])
def test_values_and_gradients_equal_dense_reference(direction, top_k, chunk):
    h_s, w_s, h_t, w_t = inputs()
    valid = 37  # the last 3 columns are Megatron's vocabulary padding
    a, b = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    kl = vocab_parallel_kl(a, b, h_t, w_t, None, valid, direction, top_k, chunk_size=chunk)
    ref_a, ref_b = h_s.double().requires_grad_(), w_s.double().requires_grad_()
    ref = dense_kl(ref_a, ref_b, h_t, w_t, valid, direction, top_k)
    assert torch.allclose(kl.double(), ref, atol=1e-5), (kl - ref).abs().max()
    assert (ref >= -1e-9).all() and ref.max() > 0.1  # a real KL, not a degenerate case
    g = torch.randn(len(kl), generator=torch.Generator().manual_seed(1))
    ga, gb = torch.autograd.grad((kl * g).sum(), [a, b])
    ra, rb = torch.autograd.grad((ref * g.double()).sum(), [ref_a, ref_b])
    assert torch.allclose(ga.double(), ra, atol=1e-5), (ga - ra).abs().max()
    assert torch.allclose(gb.double(), rb, atol=1e-5), (gb - rb).abs().max()
    assert gb[valid:].abs().max() == 0  # padded rows get no gradient


def test_top_k_kl_sees_the_mass_the_student_moves_outside_the_teachers_top_k():
    """The review's case: teacher logits [5, 4, 3, 0, 0, 0], student [5, 4, 3, 0, 0, 9], k = 3. Both
    renormalised on the top-k alone gave KL 0 and no gradient on token 5, where the student puts 97 % of
    its mass (full KL 5.15); with the tail bucket the top-k KL sees it, and pushes token 5 down."""
    eye = torch.eye(6)
    z_t, z_s = torch.tensor([[5.0, 4, 3, 0, 0, 0]]), torch.tensor([[5.0, 4, 3, 0, 0, 9]])
    h_s = z_s.clone().requires_grad_()
    kl = vocab_parallel_kl(h_s, eye, z_t, eye, top_k=3)  # identity LM heads: the hidden states are the logits
    full = vocab_parallel_kl(z_s, eye, z_t, eye)
    assert full.item() == pytest.approx(5.15, abs=0.01)
    p_s, p_t = z_s.softmax(-1)[0], z_t.softmax(-1)[0]
    P_tail, Q_tail = p_s[3:].sum(), p_t[3:].sum()
    by_hand = (p_s[:3] * (p_s[:3] / p_t[:3]).log()).sum() + P_tail * (P_tail / Q_tail).log()
    assert kl.item() == pytest.approx(by_hand.item(), rel=1e-5) and 0.5 * full.item() < kl.item() <= full.item()
    (grad,) = torch.autograd.grad(kl.sum(), h_s)
    assert grad[0, 5] > 0.1  # descending the KL lowers token 5's logit


def test_kl_of_identical_models_is_zero_and_top_k_of_the_whole_vocabulary_is_full():
    h_s, w_s, _, _ = inputs()
    assert vocab_parallel_kl(h_s, w_s, h_s, w_s, None, 40).abs().max() < 1e-5
    _, _, h_t, w_t = inputs()
    full = vocab_parallel_kl(h_s, w_s, h_t, w_t, None, 40)
    assert torch.allclose(full, vocab_parallel_kl(h_s, w_s, h_t, w_t, None, 40, top_k=40), atol=1e-6)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produced (elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_peak_temporaries_are_bounded_by_the_chunk_not_tokens_times_vocab():
    n, vocab, chunk = 512, 2048, 16
    h_s, w_s, h_t, w_t = inputs(n=n, vpad=vocab)
    a, b = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    with LargestTensor() as mode:
        kl = vocab_parallel_kl(a, b, h_t, w_t, None, vocab, chunk_size=chunk)
        kl.sum().backward()
    # [chunk, V] logits and temporaries; the full [n, V] logits (1M elements) never exist
    assert mode.largest <= chunk * vocab, mode.largest
    assert mode.largest < n * vocab // 16


def test_bad_inputs_name_the_argument():
    h_s, w_s, h_t, w_t = inputs()
    with pytest.raises(ValueError, match="direction"):
        vocab_parallel_kl(h_s, w_s, h_t, w_t, direction="sideways")
    with pytest.raises(ValueError, match="teacher_hidden"):
        vocab_parallel_kl(h_s, w_s, h_t[:3], w_t)
    with pytest.raises(ValueError, match="teacher_lm_head"):
        vocab_parallel_kl(h_s, w_s, h_t, w_t[:5])
    with pytest.raises(ValueError, match="top_k"):
        vocab_parallel_kl(h_s, w_s, h_t, w_t, top_k=0)


def test_tp2_full_and_top_k_kl_and_gradients_equal_tp1():
    out = run_ranks(Path(__file__).parent / "workers" / "vocab_kl_tp.py", 2)
    assert out.count('"rank"') == 2


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("chunk", [3, 64])
def test_one_pass_kl_and_logprobs_equal_dense_references(direction, top_k, chunk):
    """KL over M, the student's log p(target) and entropy and the teacher's log p(target) over the whole
    vocabulary, from one pass: values and the student's gradients of g1 KL + g2 log p + g3 H equal
    float64 autograd through dense log_softmax."""
    h_s, w_s, h_t, w_t = inputs()
    valid = 37
    target = torch.randint(0, valid, (len(h_s),), generator=torch.Generator().manual_seed(2))
    a, b = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    kl, lp, ent, lp_t = vocab_parallel_kl_and_logprobs(a, b, h_t, w_t, target, None, valid, direction, top_k,
                                                       compute_entropy=True, chunk_size=chunk)
    ra, rb = h_s.double().requires_grad_(), w_s.double().requires_grad_()
    ref_kl = dense_kl(ra, rb, h_t, w_t, valid, direction, top_k)
    ls = (ra @ rb.t())[:, :valid].log_softmax(-1)
    lt = (h_t.double() @ w_t.double().t())[:, :valid].log_softmax(-1)
    ref_lp, ref_lp_t = ls.gather(1, target[:, None])[:, 0], lt.gather(1, target[:, None])[:, 0]
    ref_ent = -(ls.exp() * ls).sum(-1)
    for got, ref in ((kl, ref_kl), (lp, ref_lp), (ent, ref_ent), (lp_t, ref_lp_t)):
        assert torch.allclose(got.double(), ref, atol=1e-5), (got - ref).abs().max()
    g = torch.randn(3, len(kl), generator=torch.Generator().manual_seed(1))
    ga, gb = torch.autograd.grad((kl * g[0] + lp * g[1] + ent * g[2]).sum(), [a, b])
    rga, rgb = torch.autograd.grad((ref_kl * g[0] + ref_lp * g[1] + ref_ent * g[2]).sum(), [ra, rb])
    assert torch.allclose(ga.double(), rga, atol=1e-5), (ga - rga).abs().max()
    assert torch.allclose(gb.double(), rgb, atol=1e-5), (gb - rgb).abs().max()
    assert gb[valid:].abs().max() == 0
    # the KL alone is the KL of the separate function
    torch.testing.assert_close(kl, vocab_parallel_kl(h_s, w_s, h_t, w_t, None, valid, direction, top_k))


class LMHeadGEMMs(TorchDispatchMode):
    """Rows pushed through a GEMM with each given weight as its right operand (the logits GEMMs)."""

    def __init__(self, weights: dict):
        super().__init__()
        self.ptrs = {w.untyped_storage().data_ptr(): (name, tuple(w.t().shape)) for name, w in weights.items()}
        self.rows = dict.fromkeys(weights, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:  # hidden [c, H] @ weight^T [H, V]: one logits GEMM of c rows
            name, shape = self.ptrs.get(args[1].untyped_storage().data_ptr(), (None, None))
            if name is not None and tuple(args[1].shape) == shape:
                self.rows[name] += args[0].shape[0]
        return func(*args, **(kwargs or {}))


def test_one_pass_runs_each_lm_head_twice_per_token_where_separate_passes_ran_it_three_and_four_times():
    """Logits GEMMs per model and token, forward + backward of a KL step that also needs the student's
    and the teacher's sampled-token log-probs: 2 and 2 in one pass; the separate functions (teacher
    log-probs in scoring, student log-probs in the update, then the KL) run the teacher's 3 times and the
    student's 4 times (their backward recomputes too)."""
    from megatron_opd.logprobs import fused_lm_head_token_logprobs

    h_s, w_s, h_t, w_t = inputs(n=16)
    target = torch.randint(0, 37, (16,))
    a, b = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    with LMHeadGEMMs({"student": b, "teacher": w_t}) as one:
        kl, lp, _, lp_t = vocab_parallel_kl_and_logprobs(a, b, h_t, w_t, target, None, 37, chunk_size=4)
        (kl + lp).sum().backward()
    a, b = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    with LMHeadGEMMs({"student": b, "teacher": w_t}) as separate:
        with torch.no_grad():
            fused_lm_head_token_logprobs(h_t, w_t, target, valid_vocab_size=37, chunk_size=4)
        lp, _ = fused_lm_head_token_logprobs(a, b, target, valid_vocab_size=37, chunk_size=4)
        kl = vocab_parallel_kl(a, b, h_t, w_t, None, 37, chunk_size=4)
        (kl + lp).sum().backward()
    per_token = lambda m: {k: v / 16 for k, v in m.rows.items()}  # noqa: E731
    assert per_token(one) == {"student": 2, "teacher": 2}, one.rows
    assert per_token(separate) == {"student": 4, "teacher": 3}, separate.rows
