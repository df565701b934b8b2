"""megatron_opd/versions.py: the pins a job checks where it runs agree with setup.py, and a mismatch is
one message naming each package."""

import re

import pytest

from megatron_opd import versions
from mopd_testing import REPO_ROOT


def test_pins_agree_with_setup_py():
    text = (REPO_ROOT / "setup.py").read_text()
    for name, version in versions.PINNED.items():
        dists = versions.DISTRIBUTIONS.get(name, (name,))
        found = {d: re.findall(rf'"{re.escape(d)}(?:\[[^\]]*\])?==([^"]+)"', text) for d in dists}
        assert any(v == [version] for v in found.values()), f"{name}: setup.py has {found}, versions.py {version}"


def test_this_environment_matches_and_a_fake_requirement_does_not(monkeypatch):
    assert "megatron-core 0.16.1" in versions.check_env()
    monkeypatch.setenv(versions.ENV, "megatron-core==9.9.9")
    with pytest.raises(EnvironmentError, match=r"megatron-core: installed 0.16.1, required 9.9.9.*docker/Dockerfile"):
        versions.check_env()
    monkeypatch.setenv(versions.ENV, "nonsense")
    with pytest.raises(ValueError, match="MEGATRON_OPD_REQUIRE"):
        versions.check_env()
