"""What a method declares besides its config: its command-line flags and its representative configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import MethodConfig

__all__ = ["CliOption", "MethodExamples"]


@dataclass(frozen=True)
class CliOption:
    """One command-line flag a method declares; its value goes to the config field of the same name.

    Args:
        flag: e.g. "--rank-multiple", which fills the field `rank_multiple`.
        help: the help text; the CLI puts the owning methods' `cli_label` in front ("low-rank: …").
        type: int or float to convert the value; None keeps the string.
        choices: the values allowed, or None for any.
        switch: a flag without a value (store_true). Left out it stays None, so the config's own
            default applies and a composed method does not receive an option it never asked for.
    """

    flag: str
    help: str
    type: type | None = None
    choices: tuple[str, ...] | None = None
    switch: bool = False

    def __post_init__(self):
        if not self.flag.startswith("--") or not self.field.isidentifier():
            raise ConfigError(f"a method's CLI flag looks like --name-with-dashes, got {self.flag!r}")
        if self.switch and (self.type is not None or self.choices is not None):
            raise ConfigError(f"{self.flag} is a switch: it takes no type or choices")

    @property
    def field(self) -> str:
        """The config field the flag fills: "--rank-multiple" → "rank_multiple"."""
        return self.flag[2:].replace("-", "_")


@dataclass(frozen=True)
class MethodExamples:
    """A method's representative configs: what the tests, the CUDA run and the demo use.

    Declared next to the method (`MethodConfig.examples`), so a new method is tested, run on a
    GPU and demoed by declaring them in its own file.

    Args:
        test: moderate strength, for the invariant tests on the model zoo.
        cuda: for the GPU pipeline test (small models, a few fine-tuning steps).
        demo: a strong compression, where abrupt compression loses accuracy.
        demo_setting: the demo's readable name of `demo`, e.g. "rank 4".
    """

    test: "MethodConfig"
    cuda: "MethodConfig"
    demo: "MethodConfig"
    demo_setting: str
