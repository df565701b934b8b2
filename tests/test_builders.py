"""What `OPDTrainer.setup` checks before it builds anything (megatron_opd/builders.py)."""

import os

import pytest


def test_an_unwritable_out_dir_is_refused_before_any_model_is_built(tmp_path):
    from megatron_opd.builders import check_writable

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores the mode bits: use a path under a file instead
            target = tmp_path / "a_file" / "run"
            (tmp_path / "a_file").write_text("")
        else:
            target = locked / "run"
        with pytest.raises(ValueError, match=r"train.out_dir=.* is not writable"):
            check_writable(target)
    finally:
        locked.chmod(0o700)
    check_writable(tmp_path / "fine" / "run")
    assert (tmp_path / "fine" / "run").is_dir() and not list((tmp_path / "fine" / "run").iterdir())

