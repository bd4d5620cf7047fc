"""What the command-line entry points share: one-line errors, exit codes,
compiled programs kept across runs, and huge pages for XLA's buffers."""

import argparse
import os
import pathlib
import platform
import sys
from typing import Callable, Mapping, Optional, Sequence

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
OFF = ("0", "off", "no", "none")  # what turns an environment switch off


def compilation_cache_dir() -> Optional[pathlib.Path]:
    """Where the scripts keep XLA's compiled programs between runs:
    $FERS_JAX_CACHE (off, 0 or empty: nowhere), else
    $XDG_CACHE_HOME/fers_jax/xla, else ~/.cache/fers_jax/xla."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return (None if value.strip().lower() in ("", *OFF)
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


HUGE_PAGES_ENV = "FERS_JAX_HUGE_PAGES"
THP_MODE_FILE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
_HUGETLB = "glibc.malloc.hugetlb"


def huge_pages_environment(environ: Mapping[str, str], thp_mode: Optional[str],
                           libc: tuple) -> Optional[dict]:
    """The environment to restart with so that glibc's malloc asks for
    transparent huge pages, or None where nothing would change.

    XLA:CPU takes each step's temporary buffer (hundreds of MB to GB) from
    malloc, which maps it fresh and returns it at the end of the step; the
    kernel then faults it in again 4 KB at a time on every step (85,000
    faults and 0.2 s of a 0.7 s stage-2 step here). With the tunable
    `glibc.malloc.hugetlb=1` (glibc 2.35 and later) malloc marks its
    mappings for 2 MB pages, which only matters where the kernel's THP mode
    is `madvise` (the usual default; `always` gives them already, `never`
    refuses them). glibc reads its tunables at start-up only, hence a
    restart. `thp_mode`: the bracketed word of THP_MODE_FILE (None if
    absent); `libc`: platform.libc_ver(). $FERS_JAX_HUGE_PAGES=off keeps
    the process as it is; tunables the user set are kept, and one that
    already names hugetlb is left alone (also what stops a second restart).
    """
    if environ.get(HUGE_PAGES_ENV, "").strip().lower() in OFF:
        return None
    if thp_mode != "madvise" or libc[0] != "glibc":
        return None
    try:
        version = tuple(int(v) for v in libc[1].split(".")[:2])
    except ValueError:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if version < (2, 35) or _HUGETLB in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES":
            ":".join(filter(None, (tunables, f"{_HUGETLB}=1")))}


def thp_mode() -> Optional[str]:
    """The kernel's transparent-huge-page mode (always, madvise, never)."""
    try:
        text = THP_MODE_FILE.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def restart_with_huge_pages():
    """Re-executes this script with `huge_pages_environment`'s tunable, the
    same interpreter, options and arguments (sys.orig_argv). Call it first
    thing in a script's `__main__`, before JAX loads; where nothing would
    change, or the restart fails, it returns and the script goes on as it
    is."""
    env = huge_pages_environment(os.environ, thp_mode(), platform.libc_ver())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        pass


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
