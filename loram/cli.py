"""The ``loram`` command. Every sub-command calls the same library functions as the DVC stages."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands; each defines ``add_parser(subparsers)`` which registers
# its command(s) with ``set_defaults(func=callable(args) -> int | None)``.
COMMAND_MODULES = [
    "loram.commands",
    "loram.memory",
    "loram.report",
    "loram.profiles",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loram",
        description="LoRAM: prune a model, align it, train LoRA on it, recover the adapter to the "
        "original shapes, merge it into the original model and evaluate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    import os

    from loram.config import ParamsError
    from loram.errors import LoramError

    try:
        rc = args.func(args)
    except (LoramError, ParamsError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
        if os.environ.get("LORAM_DEBUG"):
            raise
        print(f"loram {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # permissions, a full disk, a vanished file: the environment's
        if os.environ.get("LORAM_DEBUG"):
            raise
        print(f"loram {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loram {args.command}: interrupted; re-run to resume", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
