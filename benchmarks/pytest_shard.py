"""Runs shard I of N of the pytest node ids listed in a file (one per line;
ids may hold spaces, which a shell word list would split): device.sh's
sanitizer runs spread the CUDA tests over several processes this way.

    python3 benchmarks/pytest_shard.py IDS_FILE N I
"""
import sys

import pytest


def main() -> int:
    ids_file, n, i = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with open(ids_file, encoding="utf-8") as f:
        ids = [line.rstrip("\n") for line in f if "::" in line]
    mine = ids[i::n]
    if not mine:
        return 0
    # A test still running after 60 s gets every thread's Python stack dumped
    # into the log: under the sanitizers that tells a slow test from a stuck one.
    return pytest.main(["-v", "-p", "no:cacheprovider", "--durations=5", "-o", "faulthandler_timeout=60", *mine])


if __name__ == "__main__":
    sys.exit(main())
