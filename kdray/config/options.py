"""Options with their allowed range written once, and config sections filled from a registry.

    @dataclass
    class KDConfig(LossConfig):
        temperature: float = option(1.0, above=0)
        reduction: Literal["pixel_mean", "element_mean"] = "pixel_mean"

The type annotation says what a value may be (the loader enforces it, `kdray.config.loading`); `option` adds the
numeric range, which `check_options` enforces with one line naming the key, the value and the range. A rule that
ties several options together goes in the dataclass's `check(prefix)` method, which `check_options` calls.

`RegistrySections` is the mixin of a section whose sub-sections are whatever a registry holds (the `losses`
section: one sub-section per registered loss; `data`: one per registered dataset's options), so a plugin that
registers a loss or a dataset gets its options into jobs, overrides and search spaces with no other change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from kdray.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Bounds of a number (or of each number in a tuple); None: unbounded on that side."""

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None

    def describe(self) -> str:
        parts = []
        if self.at_least is not None:
            parts.append(f">= {self.at_least:g}")
        if self.above is not None:
            parts.append(f"> {self.above:g}")
        if self.at_most is not None:
            parts.append(f"<= {self.at_most:g}")
        if self.below is not None:
            parts.append(f"< {self.below:g}")
        return " and ".join(parts) if parts else "finite"

    def holds(self, value: float) -> bool:
        return (math.isfinite(value)
                and (self.at_least is None or value >= self.at_least)
                and (self.above is None or value > self.above)
                and (self.at_most is None or value <= self.at_most)
                and (self.below is None or value < self.below))


def option(default: Any, *, at_least: float | None = None, above: float | None = None,
           at_most: float | None = None, below: float | None = None, constructor: bool = True) -> Any:
    """A dataclass field with `default` and the range its value (each value, for a tuple) must lie in.

    constructor=False: the option is not passed to the module's constructor, because it configures something
    around the module (the learning rate of an optimizer the loss owns) or what it reads (the layer a loss
    compares, which the spec's `reads` turns into an input).
    """
    bounds = Range(at_least, above, at_most, below)
    metadata = {"range": bounds if bounds != Range() else None, "constructor": constructor}
    return dataclasses.field(default=default, metadata=metadata)


def not_for_constructor(cls: type) -> set[str]:
    """The fields of a config dataclass marked `option(..., constructor=False)`."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("constructor") is False}


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    """ConfigError `"<key>: got <value>; <allowed>"` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: got {value!r}; {allowed}")


def check_options(cfg: Any, prefix: str) -> None:
    """Check every `option` range of dataclass `cfg`, then its own `check(prefix)`; ConfigError on the first
    value out of range, naming `<prefix>.<option>`."""
    for f in dataclasses.fields(cfg):
        bounds = f.metadata.get("range")
        value = getattr(cfg, f.name)
        if bounds is None or value is None:
            continue
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and bounds.holds(v)
            shown = list(value) if isinstance(value, tuple) else value
            infinite = isinstance(v, float) and not math.isfinite(v) and bounds.describe() != "finite"
            finite = "finite and " if infinite else ""  # inf is >= 0, yet no weight
            require(ok, f"{prefix}.{f.name}", shown, ("each must be " if isinstance(value, tuple) else "must be ")
                    + finite + bounds.describe())
    check = getattr(cfg, "check", None)
    if callable(check):
        check(prefix)


class RegistrySections:
    """Mixin for a config dataclass that also holds one sub-section per entry of a registry.

    Subclasses are `@dataclass(eq=False, repr=False)` (this mixin compares and shows the sub-sections too) and
    implement `registered_sections()` -> `{name: config dataclass}`. Every registered name is an
    attribute (`job.losses.kd`), built from the job's mapping under that key or with its defaults; the loader
    (`kdray.config.loading.build`) treats the names like fields, so unknown keys get a did-you-mean listing
    them, and `to_dict` writes them after the ordinary fields.
    """

    section_kind: ClassVar[str] = "section"  # what a sub-section is, for messages ("loss", "dataset")

    @classmethod
    def registered_sections(cls) -> dict[str, type]:
        raise NotImplementedError

    def __post_init__(self) -> None:
        for name, config in type(self).registered_sections().items():
            if name not in self.__dict__:
                self.__dict__[name] = config()

    def sections(self) -> dict[str, Any]:
        """Every registered sub-section by name, in registration order."""
        return {name: getattr(self, name) for name in type(self).registered_sections()}

    def __getattr__(self, name: str) -> Any:
        # a section registered after this object was made (a plugin imported later): its defaults
        if not name.startswith("_"):
            config = type(self).registered_sections().get(name)
            if config is not None:
                self.__dict__[name] = config()
                return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__} has no {type(self).section_kind} or option {name!r}")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        fields = [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]
        return (all(getattr(self, n) == getattr(other, n) for n in fields)
                and self.sections() == other.sections())  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclasses it sits among

    def __repr__(self) -> str:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        inner = ", ".join(f"{k}={v!r}" for k, v in {**fields, **self.sections()}.items())
        return f"{type(self).__name__}({inner})"
