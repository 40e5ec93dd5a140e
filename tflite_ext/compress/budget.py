"""What the user can afford: flash, RAM (the tensor arena), latency and MACs on the target.

Sizes take "64KB" / "64KiB" / "1.5MB" / "20000" (bytes; K and KB are 1024 as on
microcontroller datasheets), times "5ms" / "500us" / "0.4s" (stored in µs). Any of them may be
a fraction of the unchanged model's own cost on the target instead, "0.4x": `compress`
measures that model first and sets the bound from that measurement, so the budget and the
search share one (timed apart, reference kernels measured the same file up to 25% apart).

Example:
    >>> Budget.parse(flash="64KB", arena="32KB", latency="5ms")
    Budget(flash_bytes=65536, arena_bytes=32768, latency_us=5000.0, macs=None, fractions=())
    >>> Budget.parse(latency="0.4x").of({"latency_us": 150.0}).latency_us
    60.0
    >>> Budget(latency_us=100).misses({"latency_us": 120.0})
    ['latency 120.0 µs > 100.0 µs']
"""
import dataclasses
import re

from tflite_ext.errors import InputError

_SIZE = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2, "mb": 1024 ** 2,
         "mib": 1024 ** 2}
_TIME = {"us": 1.0, "µs": 1.0, "ms": 1e3, "s": 1e6}
_COUNT = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}
METRICS = {"flash_bytes": ("flash", "bytes"), "arena_bytes": ("arena", "bytes"),
           "latency_us": ("latency", "µs"), "macs": ("MACs", "")}


def _fraction(text, flag):
    """The fraction of "0.4x", or None when `text` is not of that form."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*[xX]\s*", str(text))
    if match is None:
        return None
    value = float(match.group(1))
    if not 0 < value <= 1:
        raise InputError(f"{flag} as a fraction of the unchanged model must be > 0 and <= 1 "
                         f"(e.g. 0.5x). Received: {flag}={text!r}")
    return value


def _parse(text, units, flag):
    if isinstance(text, bool):
        raise InputError(f"{flag} must be a number with a unit. Received: {flag}={text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), None
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Zµ]*)\s*",
                             str(text))
        unit = match and match.group(2).lower()
        if not match or unit not in units:
            raise InputError(f"{flag} must be a number with one of the units "
                             f"{', '.join(u for u in units if u) or 'none'}, or a fraction "
                             f"of the unchanged model such as 0.5x. Received: {flag}={text!r}")
        value = float(match.group(1))
    value *= units[unit] if unit is not None else 1
    if not value > 0:
        raise InputError(f"{flag} must be > 0. Received: {flag}={text!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Budget:
    """Upper bounds on the target; None means unconstrained. At least one must be set.

    `fractions`: ((metric, fraction), ...) bounds relative to the unchanged model, made
    absolute by `of` once it is measured (`compress` does)."""

    flash_bytes: int = None
    arena_bytes: int = None
    latency_us: float = None
    macs: int = None
    fractions: tuple = ()

    def __post_init__(self):
        for name in METRICS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, float)) or value <= 0):
                raise InputError(f"{name} must be a number > 0. Received: {name}={value!r}")
        for name, fraction in self.fractions:
            if name not in METRICS or getattr(self, name) is not None \
                    or isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
                    or not 0 < fraction <= 1:
                raise InputError(f"fractions are (metric, 0 < fraction <= 1) of metrics not "
                                 f"bounded otherwise. Received: ({name!r}, {fraction!r})")
        if all(getattr(self, name) is None for name in METRICS) and not self.fractions:
            raise InputError("A budget needs at least one of flash_bytes, arena_bytes, "
                             "latency_us, macs. Received: none")

    @classmethod
    def parse(cls, flash=None, arena=None, latency=None, macs=None):
        """A Budget from strings with units (the CLI's --flash 64KB --latency 5ms), or
        fractions of the unchanged model ("0.4x")."""
        given = {"flash_bytes": (flash, _SIZE, "flash", int),
                 "arena_bytes": (arena, _SIZE, "arena", int),
                 "latency_us": (latency, _TIME, "latency", float),
                 "macs": (macs, _COUNT, "macs", int)}
        values, fractions = {}, []
        for name, (text, units, flag, kind) in given.items():
            if text is None:
                continue
            fraction = None if isinstance(text, (int, float)) else _fraction(text, flag)
            if fraction is None:
                value = _parse(text, units, flag)
                if kind is int and value != int(value):  # 0.5 bytes: a fraction meant?
                    raise InputError(f"{flag} is a whole count. Received: {flag}={text!r} (a "
                                     f"fraction of the unchanged model is written \"{text}x\")")
                values[name] = kind(value)
            else:
                fractions.append((name, fraction))
        return cls(**values, fractions=tuple(fractions))

    @classmethod
    def of_any(cls, budget):
        """`budget` as a Budget: one already, or a dict of its fields (flash_bytes=65536) or
        of `parse`'s (flash="64KB").

        Example:
            >>> Budget.of_any({"flash": "64KB", "latency": "0.4x"})
        """
        if isinstance(budget, cls):
            return budget
        if not isinstance(budget, dict):
            raise InputError(f"budget must be a Budget or a dict. Received: budget of type "
                             f"{type(budget).__name__}")
        if set(budget) <= {"flash", "arena", "latency", "macs"}:
            return cls.parse(**budget)
        unknown = sorted(set(budget) - set(METRICS) - {"fractions"})
        if unknown:
            raise InputError(f"budget keys are flash_bytes, arena_bytes, latency_us, macs "
                             f"(numbers), or flash, arena, latency, macs (strings such as "
                             f"'64KB', '5ms', '0.4x'). Received: {', '.join(map(repr, unknown))}")
        return cls(**budget)

    def metrics(self):
        """The constrained metrics, absolute or relative."""
        return [k for k in METRICS if getattr(self, k) is not None
                or k in dict(self.fractions)]

    def of(self, base_cost):
        """This budget with its fractions made bounds on the unchanged model's `base_cost`
        ({metric: value}, as measured on the target)."""
        values = {k: getattr(self, k) for k in METRICS}
        for name, fraction in self.fractions:
            if name not in base_cost:
                label = METRICS[name][0]
                raise InputError(f"A {label} budget relative to the unchanged model needs "
                                 f"the target to measure {name}. Received: a target that "
                                 f"measures {', '.join(sorted(base_cost))}")
            value = fraction * base_cost[name]
            values[name] = value if name == "latency_us" else max(1, int(value))
        return Budget(**values)

    def limits(self):
        """{metric: bound} of the constrained metrics (after `of`, for relative ones)."""
        if self.fractions:
            raise InputError(f"budget {self} is relative to the unchanged model: make it "
                             f"absolute with .of(its measured cost) first")
        return {k: getattr(self, k) for k in METRICS if getattr(self, k) is not None}

    def misses(self, cost):
        """What `cost` ({metric: value}) breaks, one phrase per metric; [] if it fits."""
        out = []
        for key, bound in self.limits().items():
            label, unit = METRICS[key]
            value = cost.get(key)
            if value is None:
                out.append(f"{label} not measured by this target")
            elif value > bound:
                unit = f" {unit}" if unit else ""
                out.append(f"{label} {value:,.1f}{unit} > {bound:,.1f}{unit}")
        return out

    def __str__(self):
        parts = []
        fractions = dict(self.fractions)
        for key in self.metrics():
            label, unit = METRICS[key]
            if key in fractions:
                parts.append(f"{label} <= {fractions[key]:g}x the unchanged model")
            else:
                value = getattr(self, key)  # three figures below 100: 34.7 µs, not 35
                shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
                parts.append(f"{label} <= {shown}" + (f" {unit}" if unit else ""))
        return ", ".join(parts)
