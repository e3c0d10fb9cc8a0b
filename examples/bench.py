"""`hf-fastslow bench` from Python: run one method's benchmark at the quick profile, read its headline figures beside
the peer, and render the generated block a docs page would hold (docs/bench.md).

The same as `hf-fastslow bench concept_bottleneck --profile quick --out DIR`; here into a temporary folder, so nothing
is left behind. Runs from a source checkout (the benchmark scripts live in benchmarks/, not in the installed package);
about 20 s on 2 CPU cores.
"""

import tempfile

from hf_fastslow.bench.registry import entries_by_method
from hf_fastslow.bench.report import render_block
from hf_fastslow.bench.runner import run_entries, table

entries = entries_by_method()
print(f"{len(entries)} methods in the registry; running concept_bottleneck (quick) beside its peers "
      f"({entries['concept_bottleneck'].peer})")

with tempfile.TemporaryDirectory() as out:
    report = run_entries(["concept_bottleneck"], entries, profile="quick", out_dir=out)

record = report["methods"][0]
print(f"\nstatus: {record['status']}, {record['wall_s']:.0f} s of wall, "
      f"load average {record['environment']['load_average']} at its start")
for figure in record["figures"]:
    peer = "-" if figure["peer"] is None else f"{figure['peer']:.2f}"
    print(f"  {figure['metric']}: ours {figure['ours']:.2f}, peer {peer}, paper {figure['paper'] or '-'}")
print("\nthe table the verb prints:\n" + table(report))
block = render_block(report)
print(f"\nthe generated block for a docs page: {len(block.splitlines())} lines between the markers")
