"""`python -m bench [NAME ...]`: run the named benchmark suites (default: all), each
printing its figures and ratios against a baseline measured in the same run."""

import importlib
import sys

SUITES = ["foundation", "release", "data", "rotation", "maintenance", "alerts", "burst"]

if __name__ == "__main__":
    for name in sys.argv[1:] or SUITES:
        print(f"\n##### bench.{name}", flush=True)
        importlib.import_module(f"bench.{name}").main()
