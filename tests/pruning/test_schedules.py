"""Schedules step by step against hand-computed values."""

from __future__ import annotations

import pytest

from deployprune.errors import ConfigError
from deployprune.pruning import (
    CallableScheduler,
    ConstantSparsityScheduler,
    LinearScheduler,
    PolynomialDecayScheduler,
    build_schedule,
)


def test_polynomial_zhu_gupta_values_every_step() -> None:
    s = PolynomialDecayScheduler(begin_step=0, end_step=10, frequency=2)
    # s_t = 0.8 * (1 - (1 - t/10)^3) at t = 0, 2, ..., 10; held between update steps
    expected = {0: 0.0, 1: 0.0, 2: 0.3904, 3: 0.3904, 4: 0.6272, 5: 0.6272, 6: 0.7488, 7: 0.7488,
                8: 0.7936, 9: 0.7936, 10: 0.8, 11: 0.8, 50: 0.8}
    for step, value in expected.items():
        assert s.sparsity(step, 0.8) == pytest.approx(value, abs=1e-12), step
    assert [t for t in range(15) if s.is_update_step(t)] == [0, 2, 4, 6, 8, 10]
    assert s.sparsity(10, 0.8) == 0.8  # exactly the target, not a rounding of it
    assert s.last_update_step == 10


def test_polynomial_begin_initial_and_uneven_end() -> None:
    s = PolynomialDecayScheduler(begin_step=5, end_step=12, frequency=3, initial_sparsity=0.1)
    assert s.steps == [5, 8, 11, 12]  # the end step is always an update step
    assert s.sparsity(4, 0.5) == 0.0
    assert s.sparsity(5, 0.5) == pytest.approx(0.1)
    assert s.sparsity(8, 0.5) == pytest.approx(0.5 - 0.4 * 64 / 343)  # (1 - 3/7)^3 = 64/343
    assert s.sparsity(10, 0.5) == pytest.approx(0.4253644315, abs=1e-9)
    assert s.sparsity(11, 0.5) == pytest.approx(0.4988338192, abs=1e-9)  # (1 - 6/7)^3 = 1/343
    assert s.sparsity(12, 0.5) == 0.5
    assert s.sparsity(1000, 0.5) == 0.5


def test_polynomial_coremltools_update_steps_string() -> None:
    s = build_schedule({"type": "polynomial", "update_steps": "range(0, 900, 100)"})
    assert s.steps == list(range(0, 900, 100))
    assert s.sparsity(400, 0.8) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert s.sparsity(799, 0.8) == pytest.approx(0.8 * (1 - (1 / 8) ** 3))
    assert s.sparsity(800, 0.8) == 0.8
    assert s.is_update_step(300) and not s.is_update_step(301)


def test_linear_values() -> None:
    s = LinearScheduler(begin_step=0, end_step=4, initial_sparsity=0.2)
    assert [s.sparsity(t, 0.6) for t in range(6)] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6, 0.6])


def test_constant_begin_and_frequency() -> None:
    s = ConstantSparsityScheduler(begin_step=3)
    assert [s.sparsity(t, 0.7) for t in range(6)] == [0.0, 0.0, 0.0, 0.7, 0.7, 0.7]
    assert [t for t in range(10) if s.is_update_step(t)] == [3]
    s = ConstantSparsityScheduler(begin_step=3, frequency=2, end_step=7)
    assert [t for t in range(12) if s.is_update_step(t)] == [3, 5, 7]


def test_callable_schedule_is_held_between_updates() -> None:
    s = CallableScheduler(function=lambda step, target: min(target, 0.1 * step), frequency=2, end_step=8)
    assert [s.sparsity(t, 0.5) for t in range(10)] == pytest.approx(
        [0.0, 0.0, 0.2, 0.2, 0.4, 0.4, 0.5, 0.5, 0.5, 0.5])
    assert [t for t in range(12) if s.is_update_step(t)] == [0, 2, 4, 6, 8]
    assert isinstance(build_schedule(lambda step, target: target), CallableScheduler)


def test_callable_from_import_path() -> None:
    s = build_schedule({"type": "callable", "function": "math:fmod"})
    assert s.sparsity(3, 0.4) == pytest.approx(3 % 0.4)


def test_schedule_state_dict_round_trip() -> None:
    s = PolynomialDecayScheduler(begin_step=2, end_step=20, frequency=3, initial_sparsity=0.05)
    state = s.state_dict()
    assert state["type"] == "polynomial" and state["end_step"] == 20
    t = PolynomialDecayScheduler(begin_step=2, end_step=20, frequency=3, initial_sparsity=0.05)
    t.load_state_dict(state)
    assert [t.sparsity(i, 0.5) for i in range(25)] == [s.sparsity(i, 0.5) for i in range(25)]
    with pytest.raises(ConfigError, match="checkpoint was made with schedule 'polynomial'"):
        ConstantSparsityScheduler().load_state_dict(state)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "polynomial"}, "end_step is required"),
        ({"type": "polynomial", "end_step": 10, "begin": 2}, "unknown key 'begin'"),
        ({"type": "polynomial", "update_steps": [0, 5, 5]}, "strictly increasing"),
        ({"type": "polynomial", "end_step": 10, "initial_sparsity": 1.5}, r"outside \[0, 1\)"),
        ({"type": "polynomial", "end_step": 3, "begin_step": 5}, "must be >= 5"),
        ({"type": "cosine"}, "unknown schedule 'cosine'"),
        ({"end_step": 3}, "missing 'type'"),
        ({"type": "linear", "end_step": 3, "power": 2}, "power is fixed to 1"),
        ({"type": "callable", "function": "nonexistent_mod_xyz:f"}, "comes from a file and is outside"),
    ],
)
def test_bad_schedules(spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_schedule(spec)
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)


def test_callable_value_out_of_range() -> None:
    s = CallableScheduler(function=lambda step, target: 1.5)
    with pytest.raises(ConfigError, match=r"value returned at step 0.*outside \[0, 1\)"):
        s.sparsity(0, 0.5)
