"""Where one kernel's warps stall, instruction by instruction, from ncu's source page.

    ncu ... --section SourceCounters -o rep python3 profile_moe.py ...
    ncu -i rep.ncu-rep --page source --csv --print-source sass > rep.csv
    python3 benchmarks/ncu_source.py rep.csv

Prints the sampled warp states by opcode, the instructions holding the most samples,
and the samples split by role in a warp-specialised kernel: each instruction goes
with the nearer (by address) of the producer's copies (LDGSTS, UBLKCP, UTMALDG, UTMAPF) and
the consumers' MMAs (HGMMA, HMMA); ncu lays a branch's two sides out as address
ranges, so the split is close, not exact. Only the columns it finds are used:
the address, the SASS text and the sampling counts (ncu's names vary by version).
"""
from __future__ import annotations

import argparse
import bisect
import csv
import gzip
import sys
from collections import Counter

PRODUCER = ("LDGSTS", "UBLKCP", "UTMALDG", "UTMAPF")
CONSUMER = ("HGMMA", "HMMA")


def _open(path: str):
    return gzip.open(path, "rt", newline="") if path.endswith(".gz") else open(path, newline="")


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def read_rows(path: str):
    """[(address, sass, samples, not_issued, {stall reason: samples})] and the names of the
    columns used."""
    with _open(path) as f:
        lines = [line for line in f if line.strip() and not line.startswith("==")]
    reader = csv.reader(lines)
    # ncu 2025+ opens the page with a "Kernel Name" row: the header is the first row naming
    # an address column
    for header in reader:
        if any(h.strip().lower() == "address" for h in header):
            break
    else:
        raise SystemExit(f"{path}: no header row with an Address column")
    lower = [h.lower() for h in header]

    def column(*words, avoid=()):
        for i, h in enumerate(lower):
            if all(w in h for w in words) and not any(a in h for a in avoid):
                return i
        return None

    address = column("address")
    source = column("source", avoid=("file", "line"))
    samples = column("sampling", "(all")
    if samples is None:
        samples = column("samples", avoid=("not",))
    not_issued = column("not-issued")
    if None in (address, source, samples):
        raise SystemExit(f"{path}: no address, source or sample column in {header}")
    stalls = {h[len("stall_"):]: i for i, h in enumerate(lower)
              if h.startswith("stall_") and "not issued" not in h}
    rows = []
    for record in reader:
        if len(record) <= max(address, source, samples):
            continue
        try:
            at = int(record[address], 16)
        except ValueError:
            continue
        rows.append((at, record[source].strip(), _number(record[samples]),
                     _number(record[not_issued]) if not_issued is not None else 0.0,
                     {name: _number(record[i]) for name, i in stalls.items() if i < len(record)}))
    used = [header[i] for i in (address, source, samples, not_issued) if i is not None]
    return rows, used


def opcode(sass: str) -> str:
    words = sass.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].rstrip(";") if words else "?"


def _reasons(stalls: Counter, total: float, top: int = 5) -> str:
    return ", ".join(f"{name} {100 * n / total:.1f}%" for name, n in stalls.most_common(top) if n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", help="ncu --page source --csv output (optionally .gz)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    rows, used = read_rows(args.csv)
    total = sum(r[2] for r in rows)
    if not rows or total == 0:
        print(f"{args.csv}: no sampled instructions (columns {used})")
        return 1
    print(f"{len(rows)} instructions, {total:.0f} samples (columns: {', '.join(used)})")
    all_stalls = Counter()
    for row in rows:
        all_stalls.update(row[4])
    if all_stalls:
        print(f"\nby stall reason: {_reasons(all_stalls, total, 10)}")
    by_op = Counter()
    for _, sass, samples, _, _ in rows:
        by_op[opcode(sass).split(".")[0]] += samples
    print("\nby opcode:")
    for op, samples in by_op.most_common(16):
        print(f"  {op:<10} {samples:8.0f}  {100 * samples / total:5.1f}%")
    markers = sorted((row[0], "producer" if opcode(row[1]).startswith(PRODUCER) else "consumer") for row in rows
                     if opcode(row[1]).startswith(PRODUCER + CONSUMER))
    if markers and {role for _, role in markers} == {"producer", "consumer"}:
        spots = [at for at, _ in markers]
        roles = Counter()
        role_stalls = {"producer": Counter(), "consumer": Counter()}
        for at, _, samples, _, stalls in rows:
            i = bisect.bisect_left(spots, at)
            near = min((j for j in (i - 1, i) if 0 <= j < len(spots)), key=lambda j: abs(spots[j] - at))
            roles[markers[near][1]] += samples
            role_stalls[markers[near][1]].update(stalls)
        print("\nby role (nearest copy or MMA):")
        for role, samples in roles.most_common():
            print(f"  {role:<10} {samples:8.0f}  {100 * samples / total:5.1f}%  {_reasons(role_stalls[role], total)}")
    print(f"\ntop {args.top} instructions (% of all samples; main stall reasons):")
    for at, sass, samples, not_issued, stalls in sorted(rows, key=lambda r: -r[2])[:args.top]:
        print(f"  {at & 0xfffff:#07x} {samples:7.0f} {100 * samples / total:5.1f}%  "
              f"{sass[:60]:<60} {_reasons(Counter(stalls), total, 3)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
