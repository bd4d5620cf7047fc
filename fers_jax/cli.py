"""What the command-line entry points share: one-line errors, exit codes."""

import argparse
import sys
from typing import Callable, Optional, Sequence

from fers_jax.errors import FersError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                    argparse.RawDescriptionHelpFormatter):
    """Shows every option's default, keeps the description's line breaks."""


def run(main: Callable[[Optional[Sequence[str]]], object],
        argv: Optional[Sequence[str]] = None) -> int:
    """Calls main(argv); a user's mistake becomes one line and exit code 2."""
    try:
        main(argv)
    except FersError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
