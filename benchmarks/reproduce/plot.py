"""The reproduction's figure: test accuracy and conflict occurrence per arm, every seed a point."""

from __future__ import annotations

from pathlib import Path


def plot(results: dict, path: Path) -> None:
    """Left: mean test accuracy per arm, a seed's arms joined by a line. Right: the share of steps with conflicting
    gradients on the still-shared parameters, per S and arm. Bars are means, points single seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, summary = results["seeds"], results["summary"]
    arms, thresholds = list(summary), [str(s) for s in sorted(results["thresholds"], reverse=True)]
    colors = {arm: plt.get_cmap("tab20")(i % 20) for i, arm in enumerate(arms)}  # a method and + Recon: one hue
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(11, 4 + len(arms)), 4.5),
                                         gridspec_kw={"width_ratios": [2, 3]})
    for run in runs:
        left.plot(range(len(arms)), [run["arms"][arm]["mean_accuracy"] for arm in arms], color="lightgrey",
                  zorder=1)
    for x, arm in enumerate(arms):
        values = summary[arm]["accuracy"]["values"]
        left.scatter([x] * len(values), values, color=colors[arm], zorder=2)
        left.errorbar(x + 0.12, summary[arm]["accuracy"]["mean"], yerr=summary[arm]["accuracy"]["sd"] or 0,
                      fmt="_", markersize=14, color="black", capsize=3)
    left.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    left.set_ylabel("mean test accuracy of the two tasks")
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        for x, s in enumerate(thresholds):
            figure_ = summary[arm][f"conflicts cos<{s}"]
            position = x + (i - (len(arms) - 1) / 2) * width
            right.bar(position, 100 * figure_["mean"], width * 0.9, color=colors[arm], alpha=0.8,
                      label=arm if x == 0 else None)
            right.scatter([position] * len(figure_["values"]), [100 * v for v in figure_["values"]],
                          color=colors[arm], s=8, zorder=2)
    right.set_xticks(range(len(thresholds)), [f"S = {s}" for s in thresholds])
    right.set_ylabel("% of steps with cosine < S (still-shared params)")
    right.legend(fontsize="small", ncol=2)
    config = results["config"]
    figure.suptitle(f"MultiDigits {config['image_size']}x{config['image_size']}, ResNet-18, K = {config['k']}, "
                    f"{len(runs)} seeds, {config['epochs']} epochs of {config['train_size']:,} pairs")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
