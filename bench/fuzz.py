"""Fuzz the real vendor clients against their simulators with mutated answers.

    python bench/fuzz.py --vendor davantis --seconds 60 [--seed 1]
    python bench/fuzz.py --vendor all --seconds 300      # each vendor in turn

Prints, per vendor: inputs (mutated answers served) and inputs per second, calls, escapes
(exceptions other than the vendor's errors, each with where it was raised and the mutated
answers before it), hangs, event-loop blocks over 1 s and peak memory. Exit status 1 when
anything escaped or hung. See cms_ingest/simulators/fuzzing.py.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from cms_ingest.simulators.fuzzing import FUZZED_VENDORS, FuzzReport, fuzz_vendor


async def main(vendors: list[str], seconds: float, seed: int) -> list[FuzzReport]:
    reports = []
    for vendor in vendors:
        report = await fuzz_vendor(vendor, seconds, seed=seed)
        print(report.summary(), flush=True)
        for line in report.details():
            print(line, flush=True)
        reports.append(report)
    return reports


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vendor", required=True, choices=[*FUZZED_VENDORS, "all"])
    parser.add_argument("--seconds", type=float, default=10.0, help="per vendor")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    vendors = list(FUZZED_VENDORS) if args.vendor == "all" else [args.vendor]
    reports = asyncio.run(main(vendors, args.seconds, args.seed))
    inputs = sum(r.inputs for r in reports)
    seconds = sum(r.seconds for r in reports)
    escapes = sum(r.escapes for r in reports)
    hangs = sum(r.hangs for r in reports)
    print(
        f"total: {inputs} inputs in {seconds:.0f} s ({inputs / max(seconds, 1e-9):.0f}/s), "
        f"{escapes} escapes, {hangs} hangs, "
        f"{sum(r.loop_blocks for r in reports)} event-loop blocks > 1 s"
    )
    return 1 if escapes or hangs else 0


if __name__ == "__main__":
    sys.exit(run())
