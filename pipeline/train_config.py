"""What training is asked to do (TrainConfig), and how it refuses (TrainError, SettingError).

Light on purpose, no torch: the command line builds its flags from these defaults, and a
wrong setting is refused before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.settings import SettingError, check_at_least, is_preset, unknown_preset


class TrainError(ValueError):
    """The data or the settings cannot train a model; the message names what and where."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train; the defaults reach ~99% on the digits demo in about a dozen epochs."""

    preset: str = "demo"
    epochs: int = 12
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    # Random translation by up to this many pixels: a small data set needs it (without it the
    # Mixer memorizes the 1,437 training digits and loses about a point on the test split).
    max_shift: int = 2
    seed: int = 0
    # The digits fill their frame; the published 0.875 crop would cut strokes at the edges.
    crop_fraction: float = 1.0
    interpolation: str = "bilinear"
    name: str = ""  # the checkpoint's model name; empty: mixer-<preset>-trained

    def __post_init__(self) -> None:
        if not is_preset(self.preset):
            hint = unknown_preset(self.preset)
            raise SettingError("preset", f"{self.preset!r} is unknown ({hint})")
        check_at_least("epochs", self.epochs, 1)
        check_at_least("batch_size", self.batch_size, 1)
        if self.learning_rate <= 0:
            raise SettingError("learning_rate", f"must be positive, not {self.learning_rate}")
        check_at_least("max_shift", self.max_shift, 0)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)
