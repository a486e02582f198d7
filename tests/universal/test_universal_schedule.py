"""AlphaSchedule: alpha at known epochs for every kind, and the weights it gives the layers."""

import math

import pytest

from experiments.universal_trainer import AlphaSchedule
from lego.errors import ConfigError


def test_linear_goes_from_start_to_end_over_the_epochs():
    schedule = AlphaSchedule("linear", start=0.9, end=0.5)
    assert [schedule.get_alpha(e, 5) for e in range(5)] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5])


def test_cosine_anneals_from_start_to_end():
    schedule = AlphaSchedule("cosine", start=0.9, end=0.5)
    assert schedule.get_alpha(0, 5) == pytest.approx(0.9)
    assert schedule.get_alpha(1, 5) == pytest.approx(0.5 + 0.2 * (1 + math.cos(math.pi / 4)))
    assert schedule.get_alpha(2, 5) == pytest.approx(0.7)
    assert schedule.get_alpha(4, 5) == pytest.approx(0.5)


def test_step_drops_equally_at_the_listed_epochs_and_never_past_end():
    schedule = AlphaSchedule("step", start=0.9, end=0.5, steps=[10, 20])
    assert [schedule.get_alpha(e, 30) for e in (0, 9, 10, 19, 20, 29)] == pytest.approx([0.9, 0.9, 0.7, 0.7, 0.5, 0.5])
    rising = AlphaSchedule("step", start=0.2, end=0.8, steps=[1, 2, 3])
    assert [rising.get_alpha(e, 5) for e in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8])


def test_constant_keeps_start():
    assert AlphaSchedule("constant", start=0.6).get_alpha(7, 10) == 0.6


def test_weights_give_alpha_to_layer_one_and_the_rest_to_the_last():
    assert AlphaSchedule("linear", 0.9, 0.5).weights(4, 5, 4) == pytest.approx({1: 0.5, 2: 0.0, 3: 0.0, 4: 0.5})
    assert AlphaSchedule("constant", 0.7).weights(0, 1, 1) == pytest.approx({1: 1.0})


def test_bad_schedules_name_the_key():
    with pytest.raises(ConfigError, match="alpha_schedule.kind"):
        AlphaSchedule("exponential")
    with pytest.raises(ConfigError, match="alpha_schedule.start"):
        AlphaSchedule("linear", start=1.5)
    with pytest.raises(ConfigError, match="alpha_schedule.steps"):
        AlphaSchedule("step", steps=[])
