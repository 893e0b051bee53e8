"""Long fuzzing run of the four parsers (``make fuzz``): the CI fuzz tests, with random seeds, for minutes.

Why a driver and not pytest: Hypothesis has no wall-clock budget, so each parser's
``@given`` tests are called again and again (``DELTAMEM_FUZZ_EXAMPLES`` examples a
call, fresh random seeds each time) until ``--minutes`` per parser are spent.  Any
failure prints Hypothesis's minimal example and makes the exit status 1.  Paste the
summary into docs/reliability.md ("make fuzz results").

    python scripts/fuzz.py --minutes 10            # all four parsers, 10 min each
    python scripts/fuzz.py --minutes 1 statefile   # one parser
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
import traceback
from pathlib import Path

PARSERS = {
    "statefile": "test_fuzz_statefile",
    "torch_zip": "test_fuzz_torch_zip",
    "safetensors": "test_fuzz_safetensors",
    "gguf_header": "test_fuzz_gguf_header",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="time budget per parser")
    ap.add_argument("parsers", nargs="*", help=f"some of {', '.join(PARSERS)} (default: all)")
    args = ap.parse_args()
    unknown = set(args.parsers) - set(PARSERS)
    if unknown:
        ap.error(f"unknown parser(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARSERS)}")
    os.environ["DELTAMEM_FUZZ_PROFILE"] = "fuzz"
    os.environ.setdefault("DELTAMEM_FUZZ_EXAMPLES", "500")
    per_call = int(os.environ["DELTAMEM_FUZZ_EXAMPLES"])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    failures = 0
    rows = []
    for name in args.parsers or list(PARSERS):
        mod = importlib.import_module(PARSERS[name])
        tests = [f for n, f in inspect.getmembers(mod, inspect.isfunction)
                 if n.startswith("test_") and hasattr(f, "hypothesis")]
        t0, calls, failed = time.monotonic(), 0, 0
        while time.monotonic() - t0 < args.minutes * 60:
            for test in tests:
                try:
                    test()
                except Exception:  # a Hypothesis failure: print the shrunk example, go on with the others
                    failed += 1
                    traceback.print_exc()
                calls += 1
        elapsed = time.monotonic() - t0
        rows.append((name, elapsed, calls, calls * per_call, failed))
        failures += failed
        print(f"{name}: {elapsed / 60:.1f} min, {calls} calls of {len(tests)} tests, "
              f"<= {calls * per_call} examples, {failed} failures", flush=True)
    print("\n| parser | minutes | examples (at most) | failures |\n|---|---|---|---|")
    for name, elapsed, _, examples, failed in rows:
        print(f"| {name} | {elapsed / 60:.1f} | {examples} | {failed} |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
