"""KL-vs-K as a PNG (matplotlib), for the CLI and the benchmarks; the dashboard draws its own."""

from __future__ import annotations

from pathlib import Path

from backend.circuits.results import SweepResult


def plot_kl_vs_k(result: SweepResult, path: str | Path) -> Path:
    """Methods overlaid with 95% CI bands on log-scaled K, plus the random-from-active curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    curves = {m: sorted((r for r in result.rows if r.method == m), key=lambda r: r.k) for m in result.methods}
    if result.random_curve:
        curves["random (from active)"] = result.random_curve
    for name, rows in curves.items():
        ks = [r.k for r in rows]
        ax.plot(ks, [r.kl_mean for r in rows], marker="o", ms=3, label=name,
                linestyle="--" if name.startswith("random (") else "-")
        ax.fill_between(ks, [r.kl_ci95[0] for r in rows], [r.kl_ci95[1] for r in rows], alpha=0.15)
    ax.axhline(result.kl_none_mean, color="grey", lw=0.8, ls=":", label="every feature removed")
    ax.set_xscale("log")
    ax.set_xlabel("K (occurrences kept per prompt)")
    ax.set_ylabel("last-token KL(clean || circuit)")
    ax.set_title(f"{result.model} · {result.task} · N={result.n_prompts}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
