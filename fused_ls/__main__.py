"""python -m fused_ls {bench,demo} [options]"""

from __future__ import annotations

import sys

USAGE = """usage: python -m fused_ls COMMAND [options]

commands:
  bench   time and memory of smoothed_xent against eager PyTorch and others on this device
  demo    label smoothing's effects on calibration and label noise, on Fashion-MNIST
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from fused_ls.bench.cli import main as run
    elif command == "demo":
        from fused_ls.demo import main as run
    else:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
