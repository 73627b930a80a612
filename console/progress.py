"""The terminal's progress bar for `mixer-label run`, fed by pipeline.progress events."""

from __future__ import annotations

from typing import Any

from pipeline.progress import ProgressEvent


class ProgressBar:
    """The terminal's bar: images done of the total (or of "?"), shards, errors, img/s, ETA."""

    def __init__(self, enabled: bool = True, file: Any = None) -> None:
        import sys

        self._bar = None
        if enabled:
            from tqdm import tqdm

            # Our own rate and ETA (from the first shard's start, not the bar's creation, so
            # actor start-up does not count) go in the postfix; tqdm's would repeat them.
            self._bar = tqdm(
                desc="labeling",
                unit="img",
                file=file or sys.stderr,
                dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}",
                total=1.0,
            )

    def __call__(self, event: ProgressEvent) -> None:
        if self._bar is None:
            return
        self._bar.n = event.fraction
        self._bar.set_postfix_str(event.describe(), refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
