"""tools/expo.py: theta_s + alpha (mean theta_teachers - theta_s) tensor by tensor, a loadable checkpoint."""

import pytest
import torch

from megatron_opd.data.tokenizer import train_tokenizer
from megatron_opd.models.hf_mapping import HFCheckpoint
from megatron_opd.models.hf_tiny import save_tiny_checkpoint
from mopd_testing import tiny_spec
from tools.expo import expo, main


def test_expo_extrapolates_every_tensor_and_loads(tmp_path):
    tok = tmp_path / "tok"
    train_tokenizer(tok)
    dirs = [save_tiny_checkpoint(tiny_spec("tiny_qwen3"), tmp_path / f"m{s}", seed=s, tokenizer_dir=tok,
                                 init_std=0.1) for s in range(3)]
    out = tmp_path / "expo"
    assert main(["--student", str(dirs[0]), "--teachers", str(dirs[1]), str(dirs[2]), "--alpha", "1.5",
                 "--out", str(out)]) == 0
    s, t1, t2, o = (HFCheckpoint(d) for d in [*dirs, out])
    assert sorted(o.keys()) == sorted(s.keys())
    for n in s.keys():
        want = s.get(n).double() + 1.5 * ((t1.get(n).double() + t2.get(n).double()) / 2 - s.get(n).double())
        torch.testing.assert_close(o.get(n).double(), want, atol=1e-6, rtol=1e-6)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)  # config and weights load
    AutoTokenizer.from_pretrained(out)
    with pytest.raises(ValueError, match="one of the inputs"):
        expo(dirs[0], [dirs[1]], 1.0, dirs[0])


def test_expo_refuses_a_teacher_of_another_architecture(tmp_path):
    tok = tmp_path / "tok"
    train_tokenizer(tok)
    a = save_tiny_checkpoint(tiny_spec("tiny_qwen3"), tmp_path / "a", seed=0, tokenizer_dir=tok)
    b = save_tiny_checkpoint(tiny_spec("tiny_qwen3", num_layers=1), tmp_path / "b", seed=1, tokenizer_dir=tok)
    with pytest.raises(ValueError, match="does not hold the student's tensors"):
        expo(a, [b], 1.5, tmp_path / "out")
    assert not (tmp_path / "out").exists()
