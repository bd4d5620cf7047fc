"""What the command-line entry points share: one-line errors, exit codes."""

import argparse
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


def run(main: Callable[[Optional[Sequence[str]]], object],
        argv: Optional[Sequence[str]] = None) -> int:
    """Calls main(argv); a user's mistake becomes one line and exit code 2.

    An int that main returns is the exit code; None means success.
    """
    try:
        result = main(argv)
    except FersError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0
