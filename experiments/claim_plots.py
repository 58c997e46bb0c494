"""Plots of the claims (experiments/claims.py): matplotlib, Agg backend, files replaced
atomically."""

from __future__ import annotations

import math

from tensorattn import workdir as workdir_files


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    plt = _pyplot()
    try:
        with workdir_files.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=90)
    finally:
        plt.close(fig)


def _length_label(n: int) -> str:
    return f"n=2^{n.bit_length() - 1}" if n & (n - 1) == 0 else f"n={n}"


def threshold(rows, c_fit, path):
    """Claim 3: cost ratio against B^t / ln n, one panel per order in `rows`, one line per n;
    `c_fit` (order -> the fitted c of claim 3's table, or None) marked."""
    plt = _pyplot()
    orders = sorted({r["order"] for r in rows})
    fig, axes = plt.subplots(1, len(orders), figsize=(4.7 * len(orders), 4.2), squeeze=False)
    for ax, t in zip(axes[0], orders):
        lengths = sorted({r["n"] for r in rows if r["order"] == t})
        cmap = plt.get_cmap("viridis")
        for i, n in enumerate(lengths):
            s = [
                r for r in rows if (r["order"], r["n"]) == (t, n) and math.isfinite(r["cost_ratio"])
            ]
            ax.semilogy(
                [r["x"] for r in s],
                [r["cost_ratio"] for r in s],
                color=cmap(i / max(1, len(lengths) - 1)),
                label=_length_label(n),
            )
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        c = c_fit.get(t)
        if c is not None:
            ax.axvline(c**t, color="r", lw=0.8, ls="--", label=f"median c={c:.2f}")
        ax.set(
            xlabel=f"B^{t} / ln n",
            ylabel="polynomial / exact cost",
            title=f"order {t}: threshold (ln n)^(1/{t})",
            xlim=(0, 3),
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    _save(fig, path)


def accuracy_bars(agg, path):
    """Claim 4: median accuracy bars (min-max whiskers) per task and model, majority dotted,
    the pairwise-feature lookup dashed."""
    plt = _pyplot()
    tasks = sorted({a["task"] for a in agg})
    models = sorted({a["model"] for a in agg})
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(tasks)), 4))
    w = 0.8 / max(1, len(models))
    for j, m in enumerate(models):
        xs, ys, lo, hi = [], [], [], []
        for i, t in enumerate(tasks):
            a = next((a for a in agg if (a["task"], a["model"]) == (t, m)), None)
            if a and a["median"] is not None:
                xs.append(i + j * w)
                ys.append(a["median"])
                lo.append(a["median"] - a["min"])
                hi.append(a["max"] - a["median"])
        ax.bar(xs, ys, w, yerr=[lo, hi], label=m, capsize=2)
    for i, t in enumerate(tasks):
        maj = next((a["majority"] for a in agg if a["task"] == t), None)
        if maj:
            ax.hlines(maj, i - w / 2, i + 0.8 - w / 2, colors="k", linestyles=":")
        lookup = next((a.get("pairwise_lookup") for a in agg if a["task"] == t), None)
        if lookup:
            ax.hlines(lookup, i - w / 2, i + 0.8 - w / 2, colors="k", linestyles="--")
    labels = [t.replace("(", "\n(") for t in tasks]  # the instance on its own line
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(tasks))], labels, fontsize=7)
    # Many-class tasks (function composition) sit far below 0.4: start at 0 then.
    lowest = min([a["min"] for a in agg if a["min"] is not None] + [1.0])
    ax.set(ylabel="held-out accuracy (median, min-max over seeds)")
    ax.set_ylim(0.0 if lowest < 0.45 else 0.4, 1.0)
    ax.plot([], [], "k:", label="majority class")
    ax.plot([], [], "k--", label="pairwise lookup")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    _save(fig, path)


def bounded(agg, path):
    """Claim 5: accuracy against the entry bound B, bounded polynomial and exact models."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for kind, label in (
        ("polynomial", "polynomial-1 (bounded)"),
        ("tensor", "exact tensor-1 (bounded)"),
    ):
        pts = sorted(
            (
                a
                for a in agg
                if a["attention"] == kind
                and a["entry_bound"] is not None
                and a["median"] is not None
            ),
            key=lambda a: a["entry_bound"],
        )
        if pts:
            ax.errorbar(
                [a["entry_bound"] for a in pts],
                [a["median"] for a in pts],
                yerr=[[a["median"] - a["min"] for a in pts], [a["max"] - a["median"] for a in pts]],
                marker="o",
                capsize=3,
                label=label,
            )
    exact = next((a for a in agg if a["entry_bound"] is None and a["median"] is not None), None)
    if exact:
        ax.axhline(exact["median"], color="g", ls="--", label="exact tensor-1, unbounded")
    if agg and agg[0].get("majority"):
        ax.axhline(agg[0]["majority"], color="k", ls=":", label="majority class")
    if agg and agg[0].get("pairwise_lookup"):
        ax.axhline(agg[0]["pairwise_lookup"], color="k", ls="-.", label="pairwise lookup")
    ax.set(xlabel="entry bound B", ylabel="Match3 held-out accuracy", xscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
