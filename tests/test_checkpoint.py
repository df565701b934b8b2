"""Checkpoint bookkeeping that needs no training: completeness, the newest complete one."""


def test_checkpoint_completeness_by_manifest(tmp_path):
    """A checkpoint is complete when its meta.json (written last) parses and its manifest matches the
    files: a missing or truncated file, or an unreadable meta.json, is named; one written before
    manifests existed is judged by its meta.json alone."""
    import json

    from megatron_opd.checkpoint import checkpoint_problem, latest_checkpoint

    def make(step, files, manifest=True):
        path = tmp_path / f"step_{step}"
        path.mkdir()
        for name, data in files.items():
            (path / name).write_bytes(data)
        meta = {"step": step, **({"manifest": {n: len(d) for n, d in files.items()}} if manifest else {})}
        (path / "meta.json").write_text(json.dumps(meta))
        return path

    old = make(1, {"a.distcp": b"x" * 10}, manifest=False)
    good = make(2, {"a.distcp": b"x" * 10, "rng_rank0.pt": b"r"})
    newest = make(3, {"a.distcp": b"x" * 10, "common.pt": b"c" * 4})
    assert checkpoint_problem(old) is None and checkpoint_problem(good) is None
    assert latest_checkpoint(tmp_path) == newest
    (newest / "common.pt").write_bytes(b"c")
    assert checkpoint_problem(newest) == "common.pt has 1 bytes, the manifest says 4"
    (good / "rng_rank0.pt").unlink()
    assert checkpoint_problem(good) == "rng_rank0.pt is missing"
    said = []
    assert latest_checkpoint(tmp_path, report=said.append) == old
    assert len(said) == 2 and "step_3" in said[0] and "step_2" in said[1]
    (old / "meta.json").write_text("{not json")
    assert checkpoint_problem(old).startswith("unreadable meta.json")
    assert latest_checkpoint(tmp_path) is None


def test_a_kill_between_the_rename_and_the_latest_pointer_does_not_redo_the_step(tmp_path):
    """`latest` is written after step_N is renamed into place: a kill in between left it naming step N-1,
    and the resumed run redid the finished step N. The newest complete directory wins."""
    import json

    from megatron_opd.checkpoint import latest_checkpoint

    for step in (1, 2):
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / "meta.json").write_text(json.dumps({"step": step, "manifest": {}}))
    (tmp_path / "step_3.tmp").mkdir()  # a save in progress is never a candidate
    (tmp_path / "latest").write_text("step_1")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_2"
