"""A cached AOT package as a worker meets it: loaded in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_cached_in_fresh_process(
    spec: str,
    precision: str,
    batch_size: int,
    cache_dir: Path,
    rows: int,
    never_imported: Sequence[str],
    image_size: int = 32,
) -> None:
    """Create `spec`'s compiled predictor from `cache_dir` in a new Python and predict `rows`
    images; fail unless the package came from the local cache and no module in
    `never_imported` was imported on the way (the worker's memory and start-up claims)."""
    script = (
        "import sys, torch\n"
        "from models.backends import create\n"
        f"p = create({spec!r}, 'torch', {precision!r}, 'cpu', batch_size={batch_size},"
        f" compile='aot', cache_dir={str(cache_dir)!r})\n"
        f"p.predict(torch.zeros({rows}, 3, {image_size}, {image_size}))\n"
        "assert p.aot_info['source'] == 'local', p.aot_info\n"
        f"loaded = [m for m in {tuple(never_imported)!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
