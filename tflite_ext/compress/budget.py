"""What the user can afford: flash, RAM (the tensor arena), latency and MACs on the target.

Sizes take "64KB" / "64KiB" / "1.5MB" / "20000" (bytes; K and KB are 1024 as on
microcontroller datasheets), times "5ms" / "500us" / "0.4s" (stored in µs).

Example:
    >>> Budget.parse(flash="64KB", arena="32KB", latency="5ms")
    Budget(flash_bytes=65536, arena_bytes=32768, latency_us=5000.0, macs=None)
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
                             f"{', '.join(u for u in units if u) or 'none'}. "
                             f"Received: {flag}={text!r}")
        value = float(match.group(1))
    value *= units[unit] if unit is not None else 1
    if not value > 0:
        raise InputError(f"{flag} must be > 0. Received: {flag}={text!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Budget:
    """Upper bounds on the target; None means unconstrained. At least one must be set."""

    flash_bytes: int = None
    arena_bytes: int = None
    latency_us: float = None
    macs: int = None

    def __post_init__(self):
        for name in METRICS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, float)) or value <= 0):
                raise InputError(f"{name} must be a number > 0. Received: {name}={value!r}")
        if all(getattr(self, name) is None for name in METRICS):
            raise InputError("A budget needs at least one of flash_bytes, arena_bytes, "
                             "latency_us, macs. Received: none")

    @classmethod
    def parse(cls, flash=None, arena=None, latency=None, macs=None):
        """A Budget from strings with units (the CLI's --flash 64KB --latency 5ms)."""
        return cls(
            flash_bytes=None if flash is None else int(_parse(flash, _SIZE, "flash")),
            arena_bytes=None if arena is None else int(_parse(arena, _SIZE, "arena")),
            latency_us=None if latency is None else _parse(latency, _TIME, "latency"),
            macs=None if macs is None else int(_parse(macs, _COUNT, "macs")))

    def limits(self):
        """{metric: bound} of the constrained metrics."""
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
        for key, bound in self.limits().items():
            label, unit = METRICS[key]
            parts.append(f"{label} <= {bound:,.0f}" + (f" {unit}" if unit else ""))
        return ", ".join(parts)
