"""The model-quality report as a page: ``report.md`` and ``report.html`` from ``quality.json``.

Both pages are built from one list of blocks (headings, paragraphs, tables, figures), so
the Markdown (for a repository or the Sphinx docs) and the HTML (for a browser) always say
the same thing.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from ..data.atomic import atomic_output

__all__ = ["report_blocks", "write_report"]

_FIGURES = [("samples.png", "Real and generated galaxies, observed through the same PSFs and noise"),
            ("histograms.png", "Distributions of every statistic"),
            ("planes.png", "Gini-M20 and size-magnitude planes"),
            ("power_spectra.png", "Azimuthally averaged power spectra")]


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.{digits}f}"


def _summary_table(report: dict) -> tuple[list, list]:
    """Rows: statistics (W1 / floor, KS / floor), C2ST; columns: every generated set."""
    sets = list(report["generation"])
    header = ["statistic"] + [f"{s}: W1 (floor)" for s in sets] + [f"{s}: KS (floor)" for s in sets]
    rows = []
    for q in report["statistics"]:
        row = [q]
        for key in ("w1", "ks"):
            for s in sets:
                g = report["generation"][s]["statistics"].get(q)
                row.append("-" if g is None else f"{_fmt(g[key])} ({_fmt(g[key + '_floor'])})")
        rows.append(row)
    mean = ["mean W1"]
    for s in sets:
        m = report["generation"][s].get("summary", {})
        mean.append(f"{_fmt(m.get('w1_mean'))} ({_fmt(m.get('w1_floor_mean'))})")
    rows.append(mean + [""] * len(sets))
    for key, label in (("c2st", "C2ST statistics"), ("c2st_images", "C2ST images (CNN)")):
        if report.get(key):
            row = [label]
            for s in sets:
                c = report[key].get(s)
                row.append("-" if c is None else f"{_fmt(c['accuracy'])} ({_fmt(c.get('floor'))})")
            rows.append(row + [""] * len(sets))
    return header, rows


def report_blocks(report: dict) -> list[tuple]:
    """The report's content as blocks: ``("h", level, text)``, ``("p", text)``,
    ``("table", header, rows)``, ``("img", file, caption)``.

    Parameters
    ----------
    report : dict
        What :func:`~galgen.evaluation.evaluate_models` returns (``quality.json``).

    Returns
    -------
    list of tuple
    """
    images = {"noiseless": "noise-free", "observed": "noisy"}.get(report["measured_on"], report["measured_on"])
    b = [("h", 1, "galgen model quality"),
         ("p", f"{report['n']} held-out galaxies of `{report['data']}`; statistics measured on the "
               f"{images} observed images (real and generated galaxies through the same PSFs "
               "and noise). W1: 1-D Wasserstein distance divided by the real sample's standard deviation; "
               "floor: the same distance between two disjoint halves of the real set (the generated set is "
               "compared with one half, at the same sample size). C2ST: held-out accuracy of a classifier "
               "telling real from generated (0.5: indistinguishable); floor: real half against real half.")]
    for note in report.get("notes", []):
        b.append(("p", f"Note: {note}"))
    if report["generation"]:
        b.append(("h", 2, "Summary"))
        b.append(("table", *_summary_table(report)))
        b.append(("h", 2, "Targets"))
        rows = []
        for s, t in report["targets"].items():
            rows.append([s, _fmt(t["w1_all_within_2x_floor"]), ", ".join(t["missed"]) or "-",
                         _fmt(report["c2st"][s]["accuracy"]), _fmt(t["c2st_at_most_0.60"])])
        b.append(("table", ["model", "W1 <= 2x floor on every statistic", "statistics missing it",
                            "C2ST (statistics)", "C2ST <= 0.60"], rows))
    if report["reconstruction"]:
        b.append(("h", 2, "Reconstruction of held-out galaxies"))
        rows = [[name, _fmt(r["median"]), f"{_fmt(r['p16'])} - {_fmt(r['p84'])}",
                 _fmt(r["fraction_in_0.95_1.15"]), _fmt(r.get("truth_median"))]
                for name, r in report["reconstruction"].items()]
        b.append(("table", ["model", "median chi2/pixel", "16-84%", "fraction in 0.95-1.15",
                            "noiseless truth median"], rows))
        for name in report["reconstruction"]:
            b.append(("img", f"reconstruction_{name}.png", f"{name}: observed, reconstruction, residual / sigma"))
    b.append(("h", 2, "Figures"))
    for f, caption in _FIGURES:
        b.append(("img", f, caption))
    if report.get("binned"):
        b.append(("h", 2, "Binned comparisons"))
        b.append(("p", "Median of each statistic, real vs generated, in quantile bins of the real flux "
                       "(magnitude) and size; KS per bin."))
        for s, by_all in report["binned"].items():
            for by, binned in by_all.items():
                header, rows = _binned_table(binned)
                if rows:
                    b.append(("h", 3, f"{s}, by {by}"))
                    b.append(("table", header, rows))
    if report.get("timing"):
        b.append(("h", 2, "Timing"))
        b.append(("table", ["step", "seconds"], [[k, _fmt(v)] for k, v in report["timing"].items()]))
    return b


def _binned_table(binned: dict) -> tuple[list, list]:
    """Rows: bins; columns: per statistic 'real median / generated median (KS)'."""
    bins = binned.get("bins", [])
    names = binned.get("names") or sorted({q for bn in bins for q in bn.get("statistics", {})})
    header = ["bin", "n real / gen"] + list(names)
    rows = []
    for bn in bins:
        lo, hi = bn.get("lo"), bn.get("hi")
        row = [f"{_fmt(lo)} - {_fmt(hi)}", f"{bn.get('n_real', '-')} / {bn.get('n_gen', '-')}"]
        for q in names:
            c = bn.get("statistics", {}).get(q)
            row.append("-" if c is None else f"{_fmt(c.get('median_real'))} / {_fmt(c.get('median_gen'))} "
                                             f"({_fmt(c.get('ks'))})")
        rows.append(row)
    return header, rows


def _markdown(blocks) -> str:
    lines = []
    for blk in blocks:
        if blk[0] == "h":
            lines += ["#" * blk[1] + " " + blk[2], ""]
        elif blk[0] == "p":
            lines += [blk[1], ""]
        elif blk[0] == "table":
            header, rows = blk[1], blk[2]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]
        elif blk[0] == "img":
            lines += [f"![{blk[2]}]({blk[1]})", "", f"*{blk[2]}*", ""]
    return "\n".join(lines)


def _html(blocks) -> str:
    e = html.escape
    body = []
    for blk in blocks:
        if blk[0] == "h":
            body.append(f"<h{blk[1]}>{e(blk[2])}</h{blk[1]}>")
        elif blk[0] == "p":
            body.append(f"<p>{e(blk[1])}</p>")
        elif blk[0] == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in blk[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in blk[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif blk[0] == "img":
            body.append(f'<figure><img src="{e(blk[1])}" alt="{e(blk[2])}"><figcaption>{e(blk[2])}</figcaption>'
                        "</figure>")
    style = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:0.85em;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>galgen model quality</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(report: dict, out) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out`` (atomically).

    Parameters
    ----------
    report : dict
        What :func:`~galgen.evaluation.evaluate_models` returns.
    out : str or os.PathLike
        Report directory (the figures are referred to by file name).

    Returns
    -------
    tuple of pathlib.Path
        The Markdown and HTML pages.
    """
    out = Path(out)
    blocks = report_blocks(report)
    paths = out / "report.md", out / "report.html"
    for path, text in zip(paths, (_markdown(blocks), _html(blocks))):
        with atomic_output(path) as tmp:
            tmp.write_text(text)
    return paths
