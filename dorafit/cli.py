"""The ``dorafit`` command: a thin dispatcher to one module per subcommand.

Each module ``dorafit.commands.<name>`` defines ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; it is imported only when its command runs, so ``dorafit --help`` stays
fast and the library never imports the command line.

Bad input, a full disk and Ctrl-C end a command with one line on stderr and exit code 2; the
line is cut to ``MAX_ERROR_CHARS`` whatever the input held. Bugs keep their traceback, and
``--debug`` shows the traceback of an input error too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from . import __version__
from .files import is_disk_full

# The longest error line printed (a message quoting a huge input value is cut).
MAX_ERROR_CHARS = 1000

COMMANDS = {
    "train": "fine-tune a model with an adapter (default: DoRA on SmolLM2-135M-Instruct, ARC-Easy)",
    "eval": "evaluate a model (and adapter) on a task",
    "merge": "merge an adapter into its base model and save a plain checkpoint",
    "convert": "convert an adapter between the dorafit and PEFT formats",
    "export": "write an adapter as a plain LoRA (truncated SVD) for LoRA-only serving engines",
    "analyze": "magnitude/direction analysis of fine-tuned weights (paper Figure 2)",
    "bench": "measure the DoRA overhead over LoRA on your model",
}


def _load(name: str):
    return importlib.import_module(f"dorafit.commands.{name}")


def _is_input_error(err: BaseException) -> bool:
    """Bad input rather than a bug: dorafit's own ValueError subclasses (config, file, data,
    model errors all derive from it) and file-system errors (missing, read-only, not a folder)."""
    return isinstance(err, OSError) or (isinstance(err, ValueError) and type(err).__module__.startswith("dorafit."))


def error_line(name: str, err: BaseException) -> str:
    """'dorafit NAME: error: MESSAGE' on one line, at most MAX_ERROR_CHARS long."""
    if isinstance(err, KeyboardInterrupt):
        text = "interrupted (Ctrl-C); nothing was written: dorafit's outputs appear whole or not at all"
    else:
        text = " ".join(str(err).split()) or type(err).__name__
        if is_disk_full(err) and not type(err).__module__.startswith("dorafit."):  # a raw OSError: say what it means
            text = (f"no space left on the device ({text}); dorafit's outputs are written whole or not at all, so "
                    "what was there before is intact: free some space and run again")
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + " [...]"
    return f"dorafit {name}: error: {text}"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # show the traceback of an input error too
    argv = [a for a in argv if a != "--debug"]
    parser = argparse.ArgumentParser(prog="dorafit", description="DoRA fine-tuning, evaluation, merging and analysis.")
    parser.add_argument("--version", action="version", version=f"dorafit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help", "--version") or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    try:
        module = _load(name)  # imports torch: a Ctrl-C here is one line too
        cmd_parser = argparse.ArgumentParser(prog=f"dorafit {name}", description=getattr(module, "HELP", COMMANDS[name]))
        module.add_arguments(cmd_parser)
        args = cmd_parser.parse_args(argv[1:])
        args.debug = debug
        return int(module.run(args) or 0)
    except KeyboardInterrupt as err:
        if debug:
            raise
        print(error_line(name, err), file=sys.stderr)
        return 2
    except Exception as err:
        if debug or not (_is_input_error(err) or is_disk_full(err)):
            raise
        print(f"{error_line(name, err)} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
