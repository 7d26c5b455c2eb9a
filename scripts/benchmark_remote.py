"""Queries per second of a simulator served over loopback vs in-process, same shapes.

    python scripts/benchmark_remote.py [--device mzi] [--width 64] [--batch 64] [--settings 100] [--delay 0.0]

The logic lives in astraora.remote.benchmark.
"""

from astraora.remote.benchmark import main

if __name__ == "__main__":
    main()
