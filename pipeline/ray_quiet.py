"""Ray started quietly: its start-up notices stay off the terminal unless asked for (-v).

A local `ray.init` logs warnings such as "Token authentication is enabled for this Ray
cluster..." through Python logging; with no handler set up they land on stderr, in the middle
of the progress bar. Quiet, Ray's logger lets only errors through while Ray starts and stops,
and workers' output is not forwarded; verbose, Ray sets up its own log handler at INFO and
forwards the workers' output to the driver.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

RAY_LOGGER = "ray"


def init_options(verbose: bool = False) -> dict[str, object]:
    """ray.init's logging arguments."""
    if verbose:
        return {"configure_logging": True, "logging_level": logging.INFO, "log_to_driver": True}
    return {"configure_logging": False, "log_to_driver": False}


@contextlib.contextmanager
def quiet_ray(verbose: bool = False) -> Iterator[None]:
    """Around ray.init / ray.shutdown: Ray's warnings and notices dropped, errors kept."""
    if verbose:
        yield
        return
    logger = logging.getLogger(RAY_LOGGER)
    saved = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(saved)
