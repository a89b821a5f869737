"""The ``hf-ext`` command line: small helpers for shell use.

    hf-ext config bf16_compile     # the path of a shipped accelerate config
    hf-ext config --list           # the names of the shipped configs

So a launch reads ``accelerate launch --config_file "$(hf-ext config bf16_compile)" recipes/train_tvd.py``.
``python -m hf_ext.cli`` works the same where the console script is not on the PATH.

Example:

```python
>>> from hf_ext.cli import main
>>> main(["config", "cpu"])  # prints the path, returns the exit status
/.../hf_ext/accelerate_configs/cpu.yaml
0

```
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .accelerate_configs import accelerate_config_names, accelerate_config_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-ext", description="hf_ext helpers")
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="print the path of a shipped accelerate config")
    config.add_argument("name", nargs="?", help=f"one of {accelerate_config_names()}")
    config.add_argument("--list", action="store_true", help="print the names of the shipped configs")
    args = parser.parse_args(argv)
    if args.command == "config":
        if args.list or args.name is None:
            print("\n".join(accelerate_config_names()))
            return 0
        try:
            print(accelerate_config_path(args.name))
        except ValueError as error:
            print(f"hf-ext: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
