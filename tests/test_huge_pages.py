"""The scripts' restart with glibc's huge-page tunable (fers_jax.cli): the
decision, and a real restart that keeps the command line and cuts the page
faults of a large fresh buffer."""

import os
import platform
import subprocess
import sys

import pytest

from fers_jax import cli

GLIBC = ("glibc", "2.36")


def test_decision():
    env = cli.huge_pages_environment({"A": "1"}, "madvise", GLIBC)
    assert env == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # The user's tunables are kept.
    env = cli.huge_pages_environment(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}, "madvise", GLIBC)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=1"
    # Nothing would change: no restart.
    assert cli.huge_pages_environment(
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC) is None
    assert cli.huge_pages_environment({}, "always", GLIBC) is None
    assert cli.huge_pages_environment({}, "never", GLIBC) is None
    assert cli.huge_pages_environment({}, None, GLIBC) is None
    assert cli.huge_pages_environment({}, "madvise", ("glibc", "2.31")) is None
    assert cli.huge_pages_environment({}, "madvise", ("", "")) is None
    for off in ("off", "0", "no", "OFF"):
        assert cli.huge_pages_environment(
            {cli.HUGE_PAGES_ENV: off}, "madvise", GLIBC) is None
    assert cli.huge_pages_environment(
        {cli.HUGE_PAGES_ENV: "on"}, "madvise", GLIBC) is not None


# Restarts itself, then counts the page faults of filling a fresh 256 MB
# buffer from malloc, as XLA:CPU takes its step buffers (NumPy would not
# do: it asks for huge pages itself).
CHILD = """
import ctypes, os, resource, sys
from fers_jax import cli
print("start", flush=True)
cli.restart_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(256 << 20), 1, 256 << 20)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:], sys.flags.optimize,
      faults, flush=True)
"""


def _child(tmp_path, **env):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", cli.HUGE_PAGES_ENV)} | env
    out = subprocess.run([sys.executable, "-O", str(script), "a", "--b"], env=env,
                         check=True, capture_output=True, text=True).stdout
    return out.splitlines()


@pytest.mark.skipif(cli.huge_pages_environment({}, cli.thp_mode(),
                                               platform.libc_ver()) is None,
                    reason="no restart on this machine (THP mode or glibc)")
def test_restart_keeps_the_command_and_cuts_page_faults(tmp_path):
    huge = _child(tmp_path)
    plain = _child(tmp_path, **{cli.HUGE_PAGES_ENV: "off"})
    # The restarted process printed "start" a second time, with the same
    # interpreter options (-O) and arguments.
    assert huge[:2] == ["start", "start"] and plain[0] == "start"
    tunables, args = huge[2].split(" ", 1)
    assert tunables == "glibc.malloc.hugetlb=1"
    assert args.startswith("['a', '--b'] 1 ")
    huge_faults = int(args.split()[-1])
    plain_faults = int(plain[1].split()[-1])
    # 4 KB pages: one fault each (65,536 for 256 MB); 2 MB pages: 128.
    assert plain_faults > 30_000
    assert huge_faults < plain_faults / 8, (huge_faults, plain_faults)
