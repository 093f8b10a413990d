"""Benchmark subcommands of tools/bench.py, one module each."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_partial(path: Path, record: dict) -> None:
    """Replace ``path`` atomically with ``record``: a long multi-run benchmark stopped before its end keeps
    the runs it finished, and a crash mid-write never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, path)
