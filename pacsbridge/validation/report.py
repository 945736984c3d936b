"""The validation report for people: ``report.html`` and its PNG figures (matplotlib, headless).

Made to be printed for a sign-off meeting: black on white, the two operating points told apart by
line style as well as colour (so a grey-scale print still reads), every number with its interval,
and what the data was.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np

from . import stats
from .run import UnitOutcome

FIGURES = {
    "roc.png": "ROC curve with the operating point in force and the proposed site operating point",
    "scores.png": "Pneumonia scores per class with both thresholds",
    "ood.png": "Out-of-distribution scores of the site's images with the model's and the site's cut",
    "reliability.png": "Reliability diagram: predicted probability against observed pneumonia share",
}
CURRENT_STYLE = {"color": "#b2182b", "linestyle": "--"}
PROPOSED_STYLE = {"color": "#2166ac", "linestyle": ":"}


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" ({ci[0]:.3f}&ndash;{ci[1]:.3f})"


def write_report(out_dir: Path, result: dict[str, Any], current: list[UnitOutcome], site: list[UnitOutcome],
                 ood_scores: list[float]) -> list[Path]:
    """Write the figures and ``report.html`` into ``out_dir``; returns the files written."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    plt.rcParams.update({"font.size": 11, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 110,
                         "savefig.bbox": "tight", "axes.spines.top": False, "axes.spines.right": False})
    # The ROC and the histograms are over the units scored at the cut in force.
    pos = [o.score for o in current if o.label == 1 and o.score is not None]
    neg = [o.score for o in current if o.label == 0 and o.score is not None]
    written = [
        _save(_roc_figure(plt, result, pos, neg), out_dir / "roc.png"),
        _save(_scores_figure(plt, result, pos, neg), out_dir / "scores.png"),
        _save(_ood_figure(plt, result, ood_scores), out_dir / "ood.png"),
        _save(_reliability_figure(plt, current), out_dir / "reliability.png"),
    ]
    path = out_dir / "report.html"
    path.write_text(render_html(result), encoding="utf-8")
    written.append(path)
    return written


def _pyplot() -> Any:  # noqa: ANN401 - the matplotlib.pyplot module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _roc_figure(plt: Any, result: dict[str, Any], pos: list[float], neg: list[float]) -> Any:  # noqa: ANN401
    """ROC over the scored units, with the operating point in force and the proposed one."""
    cur, prop = result["at_current"], result["proposed"]
    fig, ax = plt.subplots(figsize=(6, 5.4))
    fpr = tpr = None
    if pos and neg:
        fpr, tpr = stats.roc_points(pos, neg)
        ax.plot(fpr, tpr, color="black", linewidth=1.6, label="ROC (scored images)")
    for point, style, marker, name in ((cur["scored_only"], CURRENT_STYLE, "o", "in force"),
                                       (prop["scored_only"], PROPOSED_STYLE, "s", "proposed site")):
        if point["sensitivity"] is not None and point["specificity"] is not None:
            thr = cur["threshold"] if name == "in force" else prop["threshold"]
            ax.plot(1 - point["specificity"], point["sensitivity"], marker=marker, markersize=9, linestyle="none",
                    markerfacecolor="white" if name == "in force" else style["color"], markeredgecolor=style["color"],
                    markeredgewidth=2, label=f"{name}: threshold {_fmt(thr)} (scored: sens {_fmt(point['sensitivity'], 2)}, "
                    f"spec {_fmt(point['specificity'], 2)})")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="-.")
    if fpr is not None and result["auc"] is not None and result["auc"] > 0.9:
        _roc_inset(ax, fpr, tpr, cur, prop)
    auc_text = (f"AUC {result['auc']:.3f} (95 % CI {result['auc_ci'][0]:.3f}-{result['auc_ci'][1]:.3f}, DeLong)"
                if result["auc"] is not None else "AUC: needs both classes")
    ax.set_title(f"ROC, {len(pos)} pneumonia / {len(neg)} normal scored\n{auc_text}", fontsize=11)
    ax.set_xlabel("1 - specificity (normals flagged)")
    ax.set_ylabel("sensitivity (pneumonia flagged)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(loc="lower right", fontsize=9)
    return fig


def _roc_inset(ax: Any, fpr: Any, tpr: Any, cur: dict[str, Any], prop: dict[str, Any]) -> None:  # noqa: ANN401
    """A good model's curve hugs the corner: a magnified view of it, where the operating points are."""
    inset = ax.inset_axes([0.42, 0.3, 0.52, 0.42])
    inset.plot(fpr, tpr, color="black", linewidth=1.4)
    for point, style, marker, filled in ((cur["scored_only"], CURRENT_STYLE, "o", False),
                                         (prop["scored_only"], PROPOSED_STYLE, "s", True)):
        if point["sensitivity"] is not None and point["specificity"] is not None:
            inset.plot(1 - point["specificity"], point["sensitivity"], marker=marker, markersize=8,
                       markerfacecolor=style["color"] if filled else "white", markeredgecolor=style["color"],
                       markeredgewidth=2)
    inset.set_xlim(-0.005, 0.25)
    inset.set_ylim(0.75, 1.005)
    inset.set_title("magnified", fontsize=9)
    inset.tick_params(labelsize=8)


def _scores_figure(plt: Any, result: dict[str, Any], pos: list[float], neg: list[float]) -> Any:  # noqa: ANN401
    """Score histograms per class, both thresholds."""
    cur, prop = result["at_current"], result["proposed"]
    fig, axes = plt.subplots(2, 1, figsize=(7, 5.6), sharex=True)
    bins = np.linspace(0, 1, 41)
    for ax, label, name, values in ((axes[0], 1, "pneumonia", pos), (axes[1], 0, "normal", neg)):
        ax.hist(values, bins=bins, color="#999999" if label else "#dddddd", edgecolor="black", linewidth=0.5)
        ax.set_ylabel(f"{name} (n={len(values)})")
        for thr, style, what in ((cur["threshold"], CURRENT_STYLE, "in force"), (prop["threshold"], PROPOSED_STYLE,
                                                                                   "proposed")):
            if thr is not None:
                ax.axvline(thr, linewidth=2, label=f"threshold {what} {thr:.3f}", **style)
        if values and max(np.histogram(values, bins=bins)[0]) > 50:
            ax.set_yscale("log")
    axes[0].legend(fontsize=9, loc="upper center")
    axes[0].set_title("Pneumonia probability of the scored images, per label", fontsize=11)
    axes[1].set_xlabel("pneumonia probability (flagged at or above the threshold)")
    return fig


def _ood_figure(plt: Any, result: dict[str, Any], ood_scores: list[float]) -> Any:  # noqa: ANN401
    """OOD scores of the site's images with both cuts."""
    cur, prop = result["at_current"], result["proposed"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    finite = [s for s in ood_scores if math.isfinite(s)]
    if finite:
        hi = max(max(finite), cur["ood_threshold"] or 0, prop["ood_threshold"] or 0) * 1.05
        ax.hist(finite, bins=np.linspace(min(0.0, min(finite)), hi, 50), color="#bbbbbb", edgecolor="black",
                linewidth=0.5)
    for cut, style, what in ((cur["ood_threshold"], CURRENT_STYLE, "cut in force"),
                             (prop["ood_threshold"], PROPOSED_STYLE, f"site cut (keeps {result['ood_keep']:.0%})")):
        if cut is not None:
            ax.axvline(cut, linewidth=2, label=f"{what} {cut:.2f}", **style)
    ax.set_title(f"Out-of-distribution score of {len(finite)} site images (refused above the cut)", fontsize=11)
    ax.set_xlabel("OOD score (0 = typical of the training images)")
    ax.set_ylabel("images")
    ax.legend(fontsize=9)
    return fig


def _reliability_figure(plt: Any, current: list[UnitOutcome]) -> Any:  # noqa: ANN401
    """Reliability diagram of the images scored at the cut in force, with the bin counts below."""
    probs = [o.score for o in current if o.score is not None]
    ys = [o.label for o in current if o.score is not None]
    rel = stats.reliability(probs, ys)
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(6, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="-.", label="perfect calibration")
    if rel:
        _reliability_bins(ax, counts, rel)
    ax.set_title("Reliability: predicted probability vs observed pneumonia share (10 bins)", fontsize=11)
    ax.set_ylabel("share labelled pneumonia")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="lower right", fontsize=9)
    counts.set_ylabel("images")
    counts.set_xlabel("predicted probability (bin mean above, bin counts below)")
    return fig


def _reliability_bins(ax: Any, counts: Any, rel: list[dict[str, float]]) -> None:  # noqa: ANN401
    x = [b["mean_predicted"] for b in rel]
    y = [b["observed"] for b in rel]
    ax.plot(x, y, color="black", marker="o", linewidth=1.4, label="observed share per bin (95 % Wilson)")
    for b in rel:
        ci = stats.wilson_interval(round(b["observed"] * b["n"]), b["n"])
        if ci:
            ax.plot([b["mean_predicted"]] * 2, ci, color="black", linewidth=0.8)
    counts.bar([(b["lo"] + b["hi"]) / 2 for b in rel], [b["n"] for b in rel], width=0.09, color="#bbbbbb",
               edgecolor="black", linewidth=0.5)
    for b in rel:
        counts.annotate(str(b["n"]), ((b["lo"] + b["hi"]) / 2, b["n"]), ha="center", va="bottom", fontsize=8)
    counts.set_yscale("log")
    counts.set_ylim(0.8, max(b["n"] for b in rel) * 4)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, facecolor="white")
    plt.close(fig)
    return path


def _rows(point: dict[str, Any]) -> str:
    out = []
    for key, name in (("sensitivity", "Sensitivity"), ("specificity", "Specificity"), ("ppv", "PPV"), ("npv", "NPV")):
        sc = point["scored_only"]
        out.append(f"<tr><th>{name}</th><td>{_fmt(point[key])}{_ci(point.get(key + '_ci'))}</td>"
                   f"<td>{_fmt(sc[key])}{_ci(sc.get(key + '_ci'))}</td></tr>")
    out.append(f"<tr><th>TP / FN / FP / TN</th><td>{point['tp']} / {point['fn']} / {point['fp']} / {point['tn']}</td>"
               f"<td>{point['scored_only']['tp']} / {point['scored_only']['fn']} / {point['scored_only']['fp']} / "
               f"{point['scored_only']['tn']}</td></tr>")
    out.append(f"<tr><th>Refused</th><td colspan=2>{point['refused']} ({_pct(point['refusal_rate'])}), of them "
               f"out of distribution {point['ood_refused']} ({_pct(point['ood_refusal_rate'])})</td></tr>")
    return "\n".join(out)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


_HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pacsbridge site validation</title>
<style>
 body { font-family: Georgia, 'Times New Roman', serif; color: #000; background: #fff; max-width: 48em;
        margin: 1.5em auto; line-height: 1.35; }
 h1 { font-size: 1.5em; } h2 { font-size: 1.15em; border-bottom: 1px solid #000; margin-top: 1.4em; }
 table { border-collapse: collapse; margin: .5em 0; }
 th, td { border: 1px solid #555; padding: .2em .5em; text-align: left; vertical-align: top; }
 td { white-space: nowrap; }
 thead th { background: #eee; }
 figure { margin: 1em 0; page-break-inside: avoid; break-inside: avoid; }
 figure img { max-width: 100%; } figcaption { font-size: .9em; font-style: italic; }
 .sign td { height: 2.2em; min-width: 14em; }
 @media print { body { margin: 0; max-width: none; font-size: 10.5pt; } h2 { page-break-after: avoid; }
                 table { page-break-inside: avoid; } }
</style></head><body>
<h1>pacsbridge site validation</h1>
"""

_SIGN_OFF = """<h2>Sign-off</h2>
<table class="sign"><tr><th>Name</th><td></td><th>Role</th><td></td></tr>
<tr><th>Date</th><td></td><th>Signature</th><td></td></tr></table>
</body></html>
"""


def render_html(result: dict[str, Any]) -> str:
    return (_HEAD + _data_section(result) + _results_section(result) + _figures_section(result)
            + _limits_section(result["unit"]) + _SIGN_OFF)


def _data_section(result: dict[str, Any]) -> str:
    e, lab, unit = html.escape, result["labels"], result["unit"]
    return f"""<p>Model <b>{e(result['model']['model_id'])}</b> (weights SHA-256 <code>{e(result['model']['weights_sha256'][:16])}&hellip;</code>),
scored with calibration <code>{e(result['model']['calibration'])}</code>, on {e(result['created_at'])}.</p>

<h2>What the data was</h2>
<ul>
 <li>{result['n']} labelled {unit}s: {result['n_pneumonia']} pneumonia, {result['n_normal']} normal
     ({result['images']} images); labels joined on <code>{e(lab['key_column'])}</code>.</li>
 <li>{lab['files_found']} files found; {lab['files_without_label']} without a label (not used).</li>
 <li>{lab['rows']} label rows; {lab['rows_unusable']} unusable (listed below).</li>
 <li>Data hash (image identities and labels, SHA-256): <code>{e(result['data_sha256'][:16])}&hellip;</code></li>
</ul>

"""


def _results_section(result: dict[str, Any]) -> str:
    e, cur, prop, unit = html.escape, result["at_current"], result["proposed"], result["unit"]
    refused = "".join(f"<li>{e(k)}: {v}</li>" for k, v in result["refused"].items()) or "<li>none</li>"
    auc = (f"{result['auc']:.3f} (95 % CI {result['auc_ci'][0]:.3f}&ndash;{result['auc_ci'][1]:.3f}; "
           f"{e(result['auc_method'])})" if result["auc"] is not None else "n/a (needs both classes scored)")
    return f"""<h2>Results</h2>
<p>{result['scored']} of {result['n']} {unit}s scored at the settings in force. Refused, by reason:</p><ul>{refused}</ul>
<p>AUC over the scored {unit}s: {auc}.</p>
<p>Rates with 95 % Wilson intervals. <em>Triage view</em>: a refused pneumonia counts as missed and a refused
normal as not flagged. <em>Scored only</em>: refused {unit}s left out.</p>
<table><thead><tr><th>In force: threshold {_fmt(cur['threshold'])}, OOD cut {_fmt(cur['ood_threshold'], 2)}
 (calibration <code>{e(str(cur['calibration']))}</code>)</th><th>Triage view</th><th>Scored only</th></tr></thead>
{_rows(cur)}
</table>
<table><thead><tr><th>Proposed site: threshold {_fmt(prop['threshold'])}, OOD cut {_fmt(prop['ood_threshold'], 2)}</th>
 <th>Triage view</th><th>Scored only</th></tr></thead>
{_rows(prop)}
</table>
<p>Proposed threshold rule: {e(prop['rule'])}; target sensitivity {result['target_sensitivity']}.
Site OOD cut: the lowest cut at which the one-sided lower Wilson bound (confidence {result.get('ood_confidence', result['confidence'])}) on
the share of the site's images kept in scope is at least {result['ood_keep']:.0%}
({_fmt(prop['ood_local_cut'], 2)}), capped at the model's ceiling ({_fmt(prop['ood_ceiling'], 2)}).</p>
{_calibration_line(result)}

"""


def _calibration_line(result: dict[str, Any]) -> str:
    e, cal = html.escape, result.get("calibration_written")
    if cal:
        return f"<p>Calibration written: <code>{e(cal['file'])}</code>, id <code>{e(cal['id'])}</code>.</p>"
    why = ": " + e(result["calibration_refused"]) if result["calibration_refused"] else ""
    return f"<p>No calibration written{why}.</p>"


def _figures_section(result: dict[str, Any]) -> str:
    e, lab = html.escape, result["labels"]
    figures = "\n".join(f'<figure><img src="{name}" alt="{e(caption)}"><figcaption>{e(caption)} '
                        f"({name})</figcaption></figure>" for name, caption in FIGURES.items())
    unusable = "".join(f"<tr><td>{b['line']}</td><td>{e(str(b['key']))}</td><td>{e(b['reason'])}</td></tr>"
                       for b in lab["unusable"][:200])
    more = f"<p>and {len(lab['unusable']) - 200} more.</p>" if len(lab["unusable"]) > 200 else ""
    unlabelled = "".join(f"<li>{e(p)}</li>" for p in lab["files_without_label_examples"][:20])
    table = ("<table><thead><tr><th>line</th><th>key</th><th>reason</th></tr></thead>" + unusable + "</table>"
             if unusable else "<p>none</p>")
    examples = "<p>Some files without a label:</p><ul>" + unlabelled + "</ul>" if unlabelled else ""
    return f"""<h2>Figures</h2>
{figures}

<h2>Label rows that could not be used</h2>
{table}{more}
{examples}

"""


def _limits_section(unit: str) -> str:
    return f"""<h2>What these numbers do not prove</h2>
<p>They describe these {unit}s, read by these labels, at this site, now. They do not show that the model finds
pneumonia a reader would miss, that it holds for patients outside the model's intended use (the refusals above
are a safeguard, not a guarantee), or that it will hold when equipment, protocols or the population change:
validate again then. The intervals cover sampling error only, not label errors or a biased choice of studies.</p>

"""
