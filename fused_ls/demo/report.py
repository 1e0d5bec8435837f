"""Turning the demo's runs into a table, sentences, a JSON file and a reliability diagram.

Every sentence is computed from the measured numbers: the comparisons are paired by seed
(same data, noise and initial weights, only the loss differs) and say in how many seeds the
difference has the sign of the mean, so a difference smaller than the seed-to-seed spread
reads as such.
"""

from __future__ import annotations

import statistics
import textwrap

from fused_ls.demo.experiment import NUM_BINS, Setting

METRICS = ("accuracy", "nll", "ece", "confidence")
STAGES = ("before", "after_ts")
SPARSE_BIN_SHARE = 0.001  # reliability-diagram bins with fewer predictions than this share are drawn faded
CALIBRATED_WITHIN = 0.01  # |mean confidence - accuracy| below this reads as "close to calibrated"


def mean_std(values: list[float]) -> dict[str, float | None]:
    """Mean and standard deviation over seeds (n - 1); one seed has no measured spread: std None."""
    values = list(values)
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def summarize(runs: list[dict]) -> dict:
    summary = {stage: {m: mean_std([r[stage][m] for r in runs]) for m in METRICS} for stage in STAGES}
    for key in ("temperature", "train_accuracy", "train_seconds"):
        summary[key] = mean_std([r[key] for r in runs])
    return summary


def pooled_bins(runs: list[dict], stage: str) -> dict[str, list]:
    """Reliability-diagram bins over every seed's test predictions together."""
    count = [sum(r[f"bins_{stage}"]["count"][b] for r in runs) for b in range(NUM_BINS)]
    conf = [sum(r[f"bins_{stage}"]["confidence_sum"][b] for r in runs) for b in range(NUM_BINS)]
    correct = [sum(r[f"bins_{stage}"]["correct_sum"][b] for r in runs) for b in range(NUM_BINS)]
    return {
        "bin_edges": [b / NUM_BINS for b in range(NUM_BINS + 1)],
        "count": count,
        "confidence": [c / n if n else None for c, n in zip(conf, count)],
        "accuracy": [c / n if n else None for c, n in zip(correct, count)],
    }


def _pm(stat: dict, scale: float = 1.0, digits: int = 3) -> str:
    if stat["std"] is None:
        return f"{stat['mean'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def table(results: list[dict]) -> str:
    """Markdown table, mean ± std over seeds (the mean alone for one seed), clean test set."""
    head = (
        "| setting | accuracy % | NLL | ECE (15 bins) | confidence % | T | NLL after TS | ECE after TS "
        "| confidence after TS % |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        s, b, a = r["summary"], r["summary"]["before"], r["summary"]["after_ts"]
        lines.append(
            f"| {r['setting']['name']} | {_pm(b['accuracy'], 100, 1)} | {_pm(b['nll'])} | {_pm(b['ece'])} "
            f"| {_pm(b['confidence'], 100, 1)} | {_pm(s['temperature'], 1, 2)} | {_pm(a['nll'])} | {_pm(a['ece'])} "
            f"| {_pm(a['confidence'], 100, 1)} |"
        )
    return "\n".join(lines)


def _confidence_words(stats: dict) -> str:
    gap = stats["confidence"]["mean"] - stats["accuracy"]["mean"]
    where = f"mean confidence {stats['confidence']['mean']:.1%} vs accuracy {stats['accuracy']['mean']:.1%}"
    if abs(gap) < CALIBRATED_WITHIN:
        return f"close to calibrated ({where})"
    return f"{'over' if gap > 0 else 'under'}-confident by {abs(gap) * 100:.1f} points ({where})"


def _paired(base: list[dict], other: list[dict], stage: str, metric: str) -> tuple[float, int]:
    """Mean paired difference other - base, and in how many seeds it has the sign of that mean."""
    diffs = [o[stage][metric] - b[stage][metric] for b, o in zip(base, other)]
    mean = statistics.fmean(diffs)
    agreeing = sum(1 for d in diffs if (d > 0) == (mean > 0) and d != 0)
    return mean, agreeing


def _change(name: str, base: list[dict], other: list[dict], stage: str, metric: str, lower_is_better: bool,
            as_percent: bool = False) -> tuple[str, int]:
    """A phrase like 'ECE 0.081 -> 0.027 (better in 3/3 seeds)', and +1 (-1) when every seed got better
    (worse), else 0: a mean difference that some seeds contradict is not counted either way."""
    b = statistics.fmean(r[stage][metric] for r in base)
    o = statistics.fmean(r[stage][metric] for r in other)
    diff, agreeing = _paired(base, other, stage, metric)
    improved = (diff < 0) == lower_is_better
    verdict = "unchanged" if diff == 0 else f"{'better' if improved else 'worse'} in {agreeing}/{len(base)} seeds"
    if as_percent:
        text = f"{name} {b:.1%} -> {o:.1%} ({diff * 100:+.1f} points, {verdict})"
    else:
        text = f"{name} {b:.3f} -> {o:.3f} ({verdict})"
    if diff == 0 or agreeing < len(base):
        return text, 0
    return text, 1 if improved else -1


def outcome(results: list[dict], clean_holdout: bool = False) -> list[str]:
    """Sentences comparing every smoothed setting with the unsmoothed one at the same noise level."""
    by_setting = {(r["setting"]["label_smoothing"], r["setting"]["convention"], r["setting"]["noise"]): r
                  for r in results}
    sentences, compared = [], 0
    acc_better = acc_worse = ece_better = ece_worse = ts_wins = 0
    for (eps, convention, noise), r in by_setting.items():
        base = by_setting.get((0.0, "none", noise))
        if eps == 0 or base is None:
            continue
        compared += 1
        b_runs, o_runs = base["runs"], r["runs"]
        acc, acc_sign = _change("accuracy", b_runs, o_runs, "before", "accuracy", lower_is_better=False,
                                as_percent=True)
        ece, ece_sign = _change("ECE", b_runs, o_runs, "before", "ece", lower_is_better=True)
        nll, _ = _change("NLL", b_runs, o_runs, "before", "nll", lower_is_better=True)
        acc_better += acc_sign > 0
        acc_worse += acc_sign < 0
        ece_better += ece_sign > 0
        ece_worse += ece_sign < 0
        base_alone = base["summary"]["before"]["ece"]["mean"]
        ts_base = base["summary"]["after_ts"]["ece"]["mean"]
        ls_alone = r["summary"]["before"]["ece"]["mean"]
        ls_ts = r["summary"]["after_ts"]["ece"]["mean"]
        ts_wins += ts_base < ls_alone
        ts_words = f"{'beats' if ts_base < ls_alone else 'does not beat'} smoothing alone ({ls_alone:.3f})"
        if ts_base > base_alone:
            ts_words += f" and is worse than no correction at all ({base_alone:.3f})"
            if noise > 0 and not clean_holdout:
                ts_words += (": the held-out labels carry the same noise, so the temperature fits the noisy "
                             "labels, not the clean test labels (--clean-holdout fits it on clean ones)")
        sentences.append(
            f"Noise {noise:.0%}, label smoothing {eps:g} ({convention}) against none, on the clean test set, "
            f"mean of {len(o_runs)} seeds: {acc}; {ece}; {nll}. "
            f"Without smoothing the model is {_confidence_words(base['summary']['before'])}; "
            f"with it, {_confidence_words(r['summary']['before'])}. "
            f"Temperature scaling of the unsmoothed model (T = {base['summary']['temperature']['mean']:.2f}) "
            f"gives ECE {ts_base:.3f}, which {ts_words}; smoothing followed by temperature scaling "
            f"(T = {r['summary']['temperature']['mean']:.2f}) gives {ls_ts:.3f}."
        )
    if compared == 0:
        return ["No comparison: the runs need label smoothing 0 and a positive value at the same noise level."]
    headline = (
        f"Of {compared} comparison{'s' if compared > 1 else ''} with no smoothing at the same noise level, "
        f"label smoothing raised test accuracy in every seed in {acc_better} and lowered it in every seed in "
        f"{acc_worse}; it lowered the test ECE (better calibration) in every seed in {ece_better} and raised it "
        f"(worse calibration) in every seed in {ece_worse}; temperature scaling of the unsmoothed model reached "
        f"a lower mean ECE than smoothing alone in {ts_wins}."
    )
    return [headline] + sentences


def reliability_figure(results: list[dict], path: str, title: str) -> None:
    """One panel per setting: rows are noise levels, columns smoothing settings; bins pooled over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noises = sorted({r["setting"]["noise"] for r in results})
    columns = list(dict.fromkeys((r["setting"]["label_smoothing"], r["setting"]["convention"]) for r in results))
    fig, axes = plt.subplots(len(noises), len(columns), figsize=(3.3 * len(columns), 3.4 * len(noises)),
                             squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat:
        ax.set_visible(False)
    width = 1.0 / NUM_BINS
    for r in results:
        s = r["setting"]
        ax = axes[noises.index(s["noise"]), columns.index((s["label_smoothing"], s["convention"]))]
        ax.set_visible(True)
        before, after = r["reliability"]["before"], r["reliability"]["after_ts"]
        lefts = before["bin_edges"][:-1]
        # Bins holding a handful of predictions swing wildly and weigh next to nothing in the ECE:
        # they are drawn faded (bars) or left out (the temperature-scaled line), not hidden.
        total = sum(before["count"])
        sparse = [n < SPARSE_BIN_SHARE * total for n in before["count"]]
        acc = [a if a is not None else 0.0 for a in before["accuracy"]]
        conf = [c if c is not None else 0.0 for c in before["confidence"]]
        for faded in (False, True):
            keep = [i for i in range(NUM_BINS) if sparse[i] == faded and before["count"][i] > 0]
            alpha = 0.3 if faded else 1.0
            ax.bar([lefts[i] for i in keep], [acc[i] for i in keep], width=width, align="edge", color="tab:blue",
                   edgecolor="white", linewidth=0.5, alpha=alpha,
                   label=f"faded: bin with < {SPARSE_BIN_SHARE:.1%} of the predictions" if faded else "accuracy")
            # Hatched, unfilled: the gap stays readable where it overlaps the bar (under-confidence).
            ax.bar([lefts[i] for i in keep], [conf[i] - acc[i] for i in keep], bottom=[acc[i] for i in keep],
                   width=width, align="edge", fill=False, hatch="////", edgecolor="tab:red", linewidth=0.4,
                   alpha=alpha, label=None if faded else "gap to mean confidence")
        points = [(c, a) for c, a, n in zip(after["confidence"], after["accuracy"], after["count"])
                  if n >= SPARSE_BIN_SHARE * total]
        ax.plot([c for c, _ in points], [a for _, a in points], "o-", color="tab:orange", markersize=3,
                linewidth=1, label="after temperature scaling")
        ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=0.8)
        b, a = r["summary"]["before"], r["summary"]["after_ts"]
        ax.set_title(f"{s['name']}\nacc {b['accuracy']['mean']:.1%}, ECE {b['ece']['mean']:.3f}, "
                     f"after TS {a['ece']['mean']:.3f}", fontsize=8.5)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    for ax in axes[-1]:
        ax.set_xlabel("confidence")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    handles, labels = next(ax for ax in axes.flat if ax.get_visible()).get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i].startswith("faded"))
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="lower center", ncol=2, fontsize=8,
               frameon=False)
    fig.suptitle(textwrap.fill(title, width=48 * len(columns)), fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def setting_dict(setting: Setting) -> dict:
    return {
        "name": setting.name,
        "label_smoothing": setting.label_smoothing,
        "convention": setting.convention,
        "noise": setting.noise,
    }
