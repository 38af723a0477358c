"""The ``loram`` command: one sub-command per pipeline stage (the same typed ``run`` that the
DVC stage scripts call, see :mod:`loram.pipeline`) plus the tools (memory, report, profile)."""

from __future__ import annotations

import argparse
import importlib
import re
import sys

STAGE_MODULES = (
    "check",
    "base",
    "data",
    "prune",
    "align",
    "train",
    "recover",
    "merge",
    "evaluate",
    "variant",
)
"""Sub-commands backed by ``loram.pipeline.<name>`` (``check`` is the ``params`` stage)."""

TOOL_MODULES = ("loram.memory", "loram.plan", "loram.report", "loram.profiles", "loram.install")
"""Modules that register their own sub-commands with ``add_parser(subparsers)``."""


def _help(doc: str) -> str:
    """A stage module's docstring as CLI help: "Stage ``x@NAME`` (offline): text" -> "text
    (DVC stage x@NAME, offline)", reST quotes dropped."""
    m = re.match(r"Stage ``([^`]+)``(?: \(([^)]*)\))?: (.*)", " ".join(doc.split()), re.S)
    if not m:
        return doc.replace("``", "")
    stage, kind, text = m.groups()
    text = text.replace("``", "")
    return (
        f"{text[0].upper()}{text[1:].rstrip('.')} (DVC stage {stage}{', ' + kind if kind else ''})."
    )


def build_parser() -> argparse.ArgumentParser:
    from loram.pipeline.entry import add_arguments, invoke

    parser = argparse.ArgumentParser(
        prog="loram",
        description="LoRAM: prune a model, align it, train LoRA on it, recover the adapter to the "
        "original shapes, merge it into the original model and evaluate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in STAGE_MODULES:
        mod = importlib.import_module(f"loram.pipeline.{name}")
        doc = _help((mod.__doc__ or "").strip().split("\n\n")[0])
        sp = sub.add_parser(name, help=doc, description=doc)
        add_arguments(sp, mod)
        sp.set_defaults(func=lambda ns, _m=mod: invoke(_m, ns))
    for name in TOOL_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from loram.pipeline.entry import guarded

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return guarded(args.command, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
