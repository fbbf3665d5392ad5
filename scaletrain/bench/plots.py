"""PNG plots of a matrix: throughput and peak memory vs resolution, one line per engine x ranks."""

from __future__ import annotations

from pathlib import Path


def plot_results(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # headless: nodes and CI have no display
    import matplotlib.pyplot as plt

    cells = [c for c in results["cells"] if c["status"] == "ok" and not c.get("search_probe")]
    presets = sorted({c["preset"] for c in cells})
    written = []
    for metric, label, fname in (("images_per_second", "images/s (median)", "throughput.png"),
                                 ("peak_memory_gib", "peak memory per rank (GiB)", "memory.png")):
        fig, axes = plt.subplots(1, max(1, len(presets)), figsize=(5 * max(1, len(presets)), 4), squeeze=False)
        for ax, preset in zip(axes[0], presets):
            series: dict[tuple, list[tuple[int, float]]] = {}
            for c in cells:
                if c["preset"] != preset:
                    continue
                value = c[metric]["median"] if isinstance(c[metric], dict) else c[metric]
                series.setdefault((c["engine"], c["world_size"], c["micro_batch"]), []).append((c["resolution"], value))
            for (engine, world, mb), pts in sorted(series.items()):
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", label=f"{engine} x{world} mb{mb}")
            ax.set_title(preset)
            ax.set_xlabel("resolution (px)")
            ax.set_ylabel(label)
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{label} vs resolution ({results['hardware']['cpu'][:40]}, config {results['config_hash']})",
                     fontsize=9)
        fig.tight_layout()
        path = Path(out_dir) / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
