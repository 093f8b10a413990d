"""moelib benchmarks: each subcommand prints a table and writes JSON under benchmarks/results/.

    python tools/bench.py train-step --vs-hf --preset small --dtype fp32

Subcommands live in tools/benchmarks/<name>.py (``-`` in the command is ``_`` in the file), each with
``add_args(parser)``, ``run(args) -> dict``, a one-line module docstring used as its help, and optionally
``variant(args) -> str`` naming the result file's variant (e.g. the dtype).
Performance is always reported next to a peer measured in the same run, as a ratio.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import pkgutil
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import benchmarks  # noqa: E402
from moelib.parallel.report import run_main  # noqa: E402


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for info in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):  # helpers (e.g. mpirun workers), not subcommands
            continue
        module = importlib.import_module(f"benchmarks.{info.name}")
        name = info.name.replace("_", "-")
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--out", type=Path, default=None, help="JSON result path (default benchmarks/results/)")
        module.add_args(p)
        modules[name] = module
    args = parser.parse_args(argv)
    result = modules[args.command].run(args)
    if result is None:  # e.g. ``all --dry-run``: nothing was measured, so nothing is written
        return 0
    record = {"command": "python tools/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(), **result}
    out = benchmarks.result_path(args, getattr(modules[args.command], "variant", lambda a: "")(args))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "bench"))
