"""The command line of one stage module: ``stages/<name>.py`` and ``loram <name>`` parse here.

Options come from the module's ``OPTIONS`` (``--key`` with its default) plus ``--params``; the
params sections the module names are loaded (the whole file is validated) and passed to its
typed ``run``. User errors print one line and exit 2 (``LORAM_DEBUG=1``: the traceback).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Callable
from types import ModuleType


def add_arguments(parser: argparse.ArgumentParser, module: ModuleType) -> None:
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: params.yaml)"
    )
    for key, default in module.OPTIONS.items():
        parser.add_argument(
            f"--{key.replace('_', '-')}", dest=key, default=default, help=f"(default: {default})"
        )


def invoke(module: ModuleType, ns: argparse.Namespace) -> int:
    """Load the module's params sections and call its ``run`` with the options."""
    from loram.config import load_named, load_params
    from loram.pipeline.common import setup_logging

    setup_logging()
    options = {k: getattr(ns, k) for k in module.OPTIONS}
    accepts = inspect.signature(module.run).parameters
    if "params_file" in accepts:
        options["params_file"] = ns.params
    if module.SECTIONS is None:
        module.run(load_params(ns.params), **options)
        return 0
    kind = getattr(module, "OVERRIDES", None)
    if kind and options.get("name"):
        # A named base or arm: its entry's overrides on top of the shared sections.
        params = load_named(ns.params, kind, options["name"], module.SECTIONS)
        if "spec" in accepts:
            options["spec"] = params["spec"]
    else:
        params = load_params(ns.params, module.SECTIONS)
    module.run(*(params[s] for s in module.SECTIONS), **options)
    return 0


def guarded(name: str, fn: Callable[[], int | None]) -> int:
    """Run ``fn``; a user error becomes one line on stderr and exit status 2."""
    from loram.config import ParamsError
    from loram.errors import LoramError

    debug = bool(os.environ.get("LORAM_DEBUG"))
    try:
        return int(fn() or 0)
    except (LoramError, ParamsError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
        if debug:
            raise
        print(f"loram {name}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # permissions, a full disk, a vanished file: the environment's
        if debug:
            raise
        print(f"loram {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loram {name}: interrupted; re-run to resume", file=sys.stderr)
        return 130


def stage_main(module: ModuleType, argv: list[str] | None = None) -> int:
    """Entry point of ``stages/<name>.py``."""
    parser = argparse.ArgumentParser(
        prog=f"stages/{module.NAME}.py", description=(module.__doc__ or "").split("\n\n")[0]
    )
    add_arguments(parser, module)
    ns = parser.parse_args(argv)
    return guarded(module.NAME, lambda: invoke(module, ns))
