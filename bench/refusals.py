"""How long `mixer-label` takes to refuse a wrong setting, model, input or endpoint.

Each case runs the console script in a fresh process, five times, in a scratch folder; prints
a markdown row per case (exit code, median and max seconds) and checks nothing was created.

    python bench/refusals.py [.venv/bin/mixer-label]
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(script: str) -> int:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    cases = {
        "--backend tensorflow": ["run", "in", "out", "--model", "tiny", "--backend", "tensorflow"],
        "--model B/61": ["run", "in", "out", "--model", "B/61"],
        "missing input": ["run", "nope", "out", "--model", "tiny"],
        "refused S3 endpoint": ["run", "s3://b/in", "s3://b/out", "--model", "tiny"]
        + ["--s3-endpoint-url", endpoint],
        "train --preset B/61": ["train", "in", "--out", "o", "--preset", "B/61"],
        "run --help": ["run", "--help"],
    }
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "dummy", "AWS_SECRET_ACCESS_KEY": "dummy"}
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "in").mkdir()
        print("| case | exit | median s | max s |\n| --- | --- | --- | --- |")
        for name, argv in cases.items():
            times = []
            for _ in range(5):
                started = time.monotonic()
                done = subprocess.run(
                    [script, *argv], cwd=scratch, env=env, capture_output=True, text=True
                )
                times.append(time.monotonic() - started)
            median, worst = statistics.median(times), max(times)
            print(f"| {name} | {done.returncode} | {median:.2f} | {worst:.2f} |")
        created = sorted(p.name for p in Path(scratch).iterdir() if p.name != "in")
    if created:
        print(f"created: {created}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    default = str(Path(sys.executable).with_name("mixer-label"))
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else default))
