"""What the command-line entry points share: one-line errors, exit codes,
and compiled programs kept across runs."""

import argparse
import os
import pathlib
import sys
from typing import Callable, Optional, Sequence

from fers_jax.errors import FersError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                    argparse.RawDescriptionHelpFormatter):
    """Shows every option's default, keeps the description's line breaks.

    Appended to each option's help: "(required)" for a required option,
    "(default: off)" for an on/off flag, "(default: VALUE)" for an option
    with a value. An option whose default is None or empty says in its own
    help what happens without it (the word "default" or "required"); a
    "(default: None)" would tell the user nothing.
    """

    FLAGS = (argparse._StoreTrueAction, argparse._StoreFalseAction,
             argparse._StoreConstAction)

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default is argparse.SUPPRESS:
            return text
        if action.required:
            return text + " (required)"
        if not action.option_strings:
            return text
        if isinstance(action, self.FLAGS):
            return text + " (default: off)"
        if action.default is None or action.default in ((), []):
            return text
        return text + " (default: %(default)s)"


CACHE_ENV = "FERS_JAX_CACHE"
CACHE_OFF = ("", "0", "off", "no", "none")


def compilation_cache_dir() -> Optional[pathlib.Path]:
    """Where the scripts keep XLA's compiled programs between runs:
    $FERS_JAX_CACHE (off, 0 or empty: nowhere), else
    $XDG_CACHE_HOME/fers_jax/xla, else ~/.cache/fers_jax/xla."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return (None if value.strip().lower() in CACHE_OFF
                else pathlib.Path(value).expanduser())
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "fers_jax" / "xla"


def use_compilation_cache():
    """Turns on JAX's persistent compilation cache (compiles of 1 s or more,
    keyed by the program, the JAX version and the flags), so a second run
    of the same models and shapes loads its programs instead of compiling
    them again: about 15 s of a stage-2 train.py start-up on 2 CPU cores.
    A cache directory the user gave JAX (JAX_COMPILATION_CACHE_DIR) is left
    as it is; one that cannot be created is skipped with a warning."""
    import jax
    if jax.config.jax_compilation_cache_dir:
        return
    folder = compilation_cache_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"warning: {folder}: cannot keep compiled programs there "
              f"({e.strerror}); set {CACHE_ENV}=off or another folder",
              file=sys.stderr)
        return
    jax.config.update("jax_compilation_cache_dir", str(folder))


def run(main: Callable[[Optional[Sequence[str]]], object],
        argv: Optional[Sequence[str]] = None) -> int:
    """Calls main(argv); a user's mistake becomes one line and exit code 2.

    An int that main returns is the exit code; None means success. The
    compilation cache (`use_compilation_cache`) is on for the call.
    """
    use_compilation_cache()
    try:
        result = main(argv)
    except FersError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0
