"""Compare runs like the survey's tables, from Python (the same tables as `sslrecipe compare` and the TUI).

    python examples/04_compare_runs.py RUN_DIR [RUN_DIR ...]

A matrix run's folder compares its cells. Prints the flat comparison (the differing keys or the matrix's
arms and axes, every metric, mean ± std over seeds, best in bold, deltas to the baseline arm), then the
Table III and Table VII layouts, and writes the flat table to compare.csv in the current folder.
"""

import sys
from pathlib import Path

from sslrecipe.report.compare import build_table, load_runs, matrix_of

args = [a for a in sys.argv[1:] if not a.startswith("--")]
if not args:
    sys.exit(__doc__)
records = load_runs(args)
print(f"{len(records)} run(s): " + ", ".join(f"{r.label} ({r.status})" for r in records))

flat = build_table(records, "flat", matrix=matrix_of(records))
print(flat.to_markdown(), end="\n\n")
for layout in ("table3", "table7"):
    print(build_table(records, layout).to_markdown(), end="\n\n")

# the numbers, for your own plots: one value per row and metric (mean over seeds)
for row in flat.rows:
    value = row.value("agnostic/AP@0.05")
    print(f"{row.label}: agnostic AP@0.05 = {value.text()}")
Path("compare.csv").write_text(flat.to_csv())
print("wrote compare.csv")
