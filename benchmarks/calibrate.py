"""Sizing model vs measurement for every cell of a `scaletrain bench` results.json.

Memory: activations fitted on the 1-rank cells, everything else analytic; predicted for every
cell (1 and N ranks). Throughput: each N-rank cell predicted from its 1-rank cell plus the
comm model fitted on the same file's collective sweep (overlap 0). Bars (issue 6): memory
within +-10 %, N-rank img/s within +-20 %.

    python benchmarks/calibrate.py benchmarks/results/cpu_matrix.json > benchmarks/results/cpu_calibration.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaletrain.bench.sizing import calibrate, fit_activations  # noqa: E402


def main() -> None:
    results = json.loads(Path(sys.argv[1]).read_text())
    rows = calibrate(results)
    cells = [c for c in results["cells"] if c["status"] == "ok" and c["world_size"] == 1 and not c.get("search_probe")]
    fit = fit_activations(cells, host_is_device=not results["hardware"]["gpus"])
    print(f"# Sizing model vs measured ({Path(sys.argv[1]).name}, config {results['config_hash']})\n")
    print("Activation fit (bytes per image x S^2, from the 1-rank cells): "
          + ", ".join(f"{k}: {v:.0f} ({fit.points[k]} cells)" for k, v in fit.per_elem.items())
          + "; engine constants (MiB): " + ", ".join(f"{k}: {v / 2**20:+.1f}" for k, v in fit.engine_bytes.items()) + "\n")
    print("| preset | res | engine | ranks | micro | memory measured GiB | predicted | error | error of the part "
          "above baseline | img/s measured | predicted from 1 rank | error |")
    print("|" + "---|" * 12)
    for r in rows:
        ips = (f"{r['ips_measured']:.2f} | {r['ips_predicted']:.2f} | {r['ips_error']:+.1%}" if "ips_error" in r
               else "- | - | -")
        print(f"| {r['preset']} | {r['resolution']} | {r['engine']} | {r['world_size']} | {r['micro_batch']} | "
              f"{r['memory_measured_gib']:.3f} | {r['memory_predicted_gib']:.3f} | {r['memory_error']:+.1%} | "
              f"{r['above_baseline_error']:+.1%} | {ips} |")
    worst_mem = max(abs(r["memory_error"]) for r in rows)
    ips = [abs(r["ips_error"]) for r in rows if "ips_error" in r]
    print(f"\nWorst memory error {worst_mem:.1%} (bar 10 %); worst N-rank img/s error "
          f"{max(ips):.1%} (bar 20 %)." if ips else f"\nWorst memory error {worst_mem:.1%} (bar 10 %).")


if __name__ == "__main__":
    main()
