"""Pruning schedules: pure, serializable callables `step -> (should_prune, sparsity)`.

Example:
    >>> s = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=100, frequency=10)
    >>> s(0), s(50)[0], round(s(100)[1], 3)
    ((True, 0.0), True, 0.5)
"""
import keras

from tflite_ext.errors import InputError


def check_sparsity(value, name="sparsity", allow_one=False):
    """Raises InputError unless 0 <= value < 1 (<= 1 with `allow_one`); returns float(value)."""
    try:
        ok = 0.0 <= float(value) < 1.0 or (allow_one and float(value) == 1.0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise InputError(f"{name} must be in {interval}. Received: {name}={value!r}")
    return float(value)


def _check_steps(begin_step, end_step, frequency):
    if int(begin_step) < 0:
        raise InputError(f"begin_step must be >= 0. Received: begin_step={begin_step}")
    if int(end_step) != -1 and int(end_step) < int(begin_step):
        raise InputError("end_step must be -1 or >= begin_step. "
                         f"Received: begin_step={begin_step}, end_step={end_step}")
    if int(frequency) < 1:
        raise InputError(f"frequency must be >= 1. Received: frequency={frequency}")


class PruningSchedule:
    """Base class: subclasses implement `__call__(step) -> (should_prune, sparsity)` and a
    `final_sparsity` attribute (the sparsity they end at; per-group overrides ramp in
    proportion to it)."""

    def __call__(self, step):
        raise NotImplementedError

    def get_config(self):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="tflite_ext")
class ConstantSparsity(PruningSchedule):
    """Prunes to `target_sparsity` every `frequency` steps from `begin_step` to `end_step`.

    Example:
        >>> ConstantSparsity(0.5, frequency=10)(20)
        (True, 0.5)
    """

    def __init__(self, target_sparsity, begin_step=0, end_step=-1, frequency=100):
        self.target_sparsity = check_sparsity(target_sparsity, "target_sparsity")
        _check_steps(begin_step, end_step, frequency)
        self.begin_step, self.end_step, self.frequency = int(begin_step), int(end_step), int(
            frequency)

    def __call__(self, step):
        step = int(step)
        active = step >= self.begin_step and (self.end_step == -1 or step <= self.end_step)
        hit = (step - self.begin_step) % self.frequency == 0 or step == self.end_step
        return bool(active and hit), self.target_sparsity

    @property
    def final_sparsity(self):
        return self.target_sparsity

    def get_config(self):
        return {"target_sparsity": self.target_sparsity, "begin_step": self.begin_step,
                "end_step": self.end_step, "frequency": self.frequency}


@keras.saving.register_keras_serializable(package="tflite_ext")
class PolynomialDecay(PruningSchedule):
    """Ramps sparsity from `initial_sparsity` to `final_sparsity` as a polynomial.

    `sparsity(step) = final + (initial - final) * (1 - p) ** power`, with
    `p = (step - begin_step) / (end_step - begin_step)` clipped to [0, 1]. Prunes every
    `frequency` steps inside [begin_step, end_step] and always at end_step, so the final
    sparsity is reached exactly.

    Example:
        >>> PolynomialDecay(0.0, 0.8, begin_step=0, end_step=400, power=3, frequency=50)(400)
        (True, 0.8)
    """

    def __init__(self, initial_sparsity, final_sparsity, begin_step, end_step, power=3,
                 frequency=100):
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        self.final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
        if int(end_step) < 0:
            raise InputError(f"end_step must be >= 0. Received: end_step={end_step}")
        _check_steps(begin_step, end_step, frequency)
        self.begin_step, self.end_step = int(begin_step), int(end_step)
        self.power, self.frequency = float(power), int(frequency)

    def sparsity(self, step):
        """The sparsity at `step` (whether or not the step prunes)."""
        span = max(self.end_step - self.begin_step, 1)
        p = min(max((int(step) - self.begin_step) / span, 0.0), 1.0)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (
            1.0 - p) ** self.power

    def __call__(self, step):
        step = int(step)
        active = self.begin_step <= step <= self.end_step
        hit = (step - self.begin_step) % self.frequency == 0 or step == self.end_step
        return bool(active and hit), self.sparsity(step)

    def get_config(self):
        return {"initial_sparsity": self.initial_sparsity, "final_sparsity": self.final_sparsity,
                "begin_step": self.begin_step, "end_step": self.end_step, "power": self.power,
                "frequency": self.frequency}
