"""A training run stopped halfway and resumed continues as the run that never stopped: a check each family's
tests share."""

from __future__ import annotations

import pytest

from blipsearch.training.loop import run_steps, setup, wrap


def assert_resume_is_exact(config_of, names: tuple[str, ...]) -> None:
    """`config_of(run name)` -> a config of 4 steps that saves every 2: the losses `names` of steps 3 and 4
    equal, whether the run goes straight through or stops after step 2 and resumes."""
    straight = setup(config_of("straight"))
    uninterrupted = run_steps(straight, wrap(straight))
    interrupted = config_of("resumed")
    first = setup(interrupted)
    run_steps(first, wrap(first), until=2)
    resumed = setup(interrupted, resume="auto")
    assert resumed.state.step == 2
    for a, b in zip(uninterrupted[2:], run_steps(resumed, wrap(resumed)), strict=True):
        assert a["step"] == b["step"]
        for name in names:
            assert a[name] == pytest.approx(b[name], abs=1e-6), (a, b)
