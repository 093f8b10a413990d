"""Plot a training run from its --log-json file: one PNG with training and held-out loss, learning rate,
MaxVio and tokens/s against consumed tokens.

    python tools/plot_run.py checkpoints/v3_pretrain/log.jsonl            # writes log.png beside it
    python tools/plot_run.py run.jsonl -o run.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelib.parallel.report import run_main  # noqa: E402
from moelib.train.plot import plot_run  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="the JSON-lines log a run wrote (--log-json)")
    p.add_argument("-o", "--output", help="PNG to write (default: the log's name with .png)")
    args = p.parse_args(argv)
    out = plot_run(args.log, args.output or Path(args.log).with_suffix(".png"))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "plot_run"))
