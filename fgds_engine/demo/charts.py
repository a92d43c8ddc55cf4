"""The demos' and experiments' charts, drawn with matplotlib (off-screen, the Agg backend): accuracy bars per
variant, the budget curves and the feedback-scale curve. The sample grids and panels are image compositing
and stay with PIL and torchvision (``report.write_grid``)."""

from __future__ import annotations

from pathlib import Path

VARIANT_COLORS = {"no feedback": "#5a5a5a", "loss": "#e65a50", "entropy": "#78aae6"}
CYCLE = ["#5a5a5a", "#78aae6", "#f0a03c", "#6ebe6e", "#c85aaa", "#e65a50", "#9678d2", "#5ac8c8", "#bebe46"]
WIDE = CYCLE + ["#1e3c8c", "#8c5a3c", "#a0002d", "#2d8c2d", "#f0c8a0", "#000000"]  # a colour per family


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: same chart, same bytes
    _pyplot().close(fig)


def accuracy_bars(path: Path, results: dict, groups=("overall", "many", "medium", "few")) -> None:
    """Grouped bars: one group per metric in ``groups``, one bar per variant (accuracy in %)."""
    plt = _pyplot()
    names = list(results)
    fig, ax = plt.subplots(figsize=(max(7.6, 1.4 * len(names) + 0.6), 3.6))
    width = 0.8 / max(len(names), 1)
    for ni, n in enumerate(names):
        xs = [gi + (ni - (len(names) - 1) / 2) * width for gi, g in enumerate(groups)
              if results[n].get(g) is not None]
        ys = [100 * results[n][g] for g in groups if results[n].get(g) is not None]
        ax.bar(xs, ys, width=width, color=CYCLE[ni % len(CYCLE)], label=n)
    ax.set_xticks(range(len(groups)), [g.replace("_", " ") for g in groups])
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(axis="y", color="#e1e1e1")
    ax.set_axisbelow(True)
    ax.legend(ncol=min(len(names), 5), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1),
              frameon=False)
    fig.tight_layout()
    _save(fig, path)


def cap_label(points: dict, cap: str) -> str:
    """A budget point's x label: "real" for real only, the cap, and for the full budget its images per class
    where every class gets the same number (groups: "60 fill"), else "fill" (long-tail fills each class to
    the head's count)."""
    if cap == "0":
        return "real"
    if cap != "fill":
        return cap
    first = next(c for c in points if c not in ("0", "fill"))
    per = points["fill"]["images"] * int(first) / points[first]["images"]
    return f"{per:.0f} fill" if abs(per - round(per)) < 1e-9 else "fill"


def budget_curves(path: Path, data: dict, keys) -> None:
    """Per metric (rows): accuracy against synthetic images per class (evenly spaced points) and against
    generation seconds, mean over seeds with +- std bars; dashed: unguided synthesis at the full budget."""
    plt = _pyplot()
    summary = data["summary"]
    caps = list(summary["no feedback"])
    fig, axes = plt.subplots(len(keys), 2, figsize=(9.5, 3.2 * len(keys) + 0.6), squeeze=False)
    for row, k in enumerate(keys):
        target = summary["no feedback"]["fill"][k]["mean"]
        for col, ax in enumerate(axes[row]):
            for vi, (v, points) in enumerate(summary.items()):
                xs = (list(range(len(caps))) if col == 0 else [points[c]["seconds"] for c in caps])
                ax.errorbar(xs, [points[c][k]["mean"] for c in caps],
                            yerr=[points[c][k]["std"] for c in caps], marker="o", ms=4, capsize=2,
                            color=VARIANT_COLORS.get(v, CYCLE[vi % len(CYCLE)]), label=v)
            ax.axhline(target, ls="--", color="#969696", lw=1)
            if col == 0:
                ax.set_xticks(range(len(caps)), [cap_label(summary["no feedback"], c) for c in caps])
                ax.set_xlabel("synthetic images per class")
            else:
                ax.set_xlabel("generation seconds")
            ax.set_ylabel(f"{k} accuracy (%)")
            ax.grid(color="#ececec")
    prior = f", {data['grid']['prior']} color prior" if data["grid"].get("prior") else ""
    fig.suptitle(f"{data['grid']['setting']} budget curve{prior}, seeds {data['seeds']} (mean, bars +- std); "
                 "dashed: unguided at the full budget", fontsize=9)
    axes[0][1].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


CURVE_LABELS = {"minority_share": "minority-color samples", "nearest_minority_share": "same, nearest color",
                "fidelity": "fidelity (oracle)", "worst_group": "worst-group acc.",
                "minority": "minority-group acc."}


def scale_curve(path: Path, curve: dict) -> None:
    """The curve's metrics (%, mean over seeds, bars +- std) against the feedback scale (evenly spaced)."""
    plt = _pyplot()
    pts = curve["points"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for ki, (k, label) in enumerate(CURVE_LABELS.items()):
        ax.errorbar(range(len(pts)), [p[k]["mean"] for p in pts], yerr=[p[k]["std"] for p in pts], marker="o",
                    ms=4, capsize=2, color=CYCLE[(ki + 1) % len(CYCLE)], label=label)
    ax.set_xticks(range(len(pts)), [f"{p['scale']:g}" for p in pts])
    ax.set_ylim(0, 100)
    ax.set_xlabel(f"{curve['criterion']} feedback scale ({curve['prior']} prior; seeds "
                  f"{', '.join(map(str, curve['seeds']))})")
    ax.set_ylabel("%")
    ax.grid(color="#ececec")
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    fig.tight_layout()
    _save(fig, path)


def equal_seconds(path: Path, rows: dict, metric: str, title: str, picked: dict | None = None) -> None:
    """Accuracy (``metric``, %, mean over the seeds of ``rows``) against generation seconds (mean): a line per
    family of rows drawn from one sampler at several sizes (unguided, unguided CFG 1.0, each selection
    criterion over K), a point for each other row; the picks of the rule ringed."""
    plt = _pyplot()
    names = list(next(iter(rows.values())))
    mean = lambda r, k: sum(s[r][k] for s in rows.values()) / len(rows)  # noqa: E731
    families: dict[str, list[str]] = {}
    for r in names:
        if r == "real only":
            continue
        head = r.rsplit(" ", 1)[0] if r.split()[-1][0] in "xK" and r.split()[-1][1:2].isdigit() else r
        families.setdefault(head, []).append(r)
    fig, ax = plt.subplots(figsize=(8.2, 5.0))
    for fi, (head, members) in enumerate(families.items()):
        members = sorted(members, key=lambda r: mean(r, "seconds"))
        xs, ys = [mean(r, "seconds") for r in members], [100 * mean(r, metric) for r in members]
        ax.plot(xs, ys, marker="o" if len(members) > 1 else "s", ms=4, color=WIDE[fi % len(WIDE)],
                label=head, linestyle="-" if len(members) > 1 else "none")
    for r in ((picked or {}).get("feedback"), (picked or {}).get("rival")):
        if r in names:
            ax.plot([mean(r, "seconds")], [100 * mean(r, metric)], marker="o", ms=12, mfc="none", color="k")
    ax.axhline(100 * mean("real only", metric), color="0.6", linestyle=":", label="real only")
    ax.set_xlabel("generation seconds (sampling + selection's classifier passes)")
    ax.set_ylabel(f"{metric.replace('_', ' ')} accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)
