"""Sphinx configuration for galgen (numpydoc + autosummary + MyST for Markdown pages)."""

import sys
from pathlib import Path

import yaml
from docutils import nodes
from docutils.parsers.rst import Directive, directives

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import galgen  # noqa: E402

project = "galgen"
author = "galgen developers"
copyright = "2026, galgen developers"
release = version = galgen.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
autosummary_generate = True
autodoc_default_options = {"members": True, "inherited-members": False}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
myst_heading_anchors = 3
html_theme = "alabaster"
html_static_path = []
suppress_warnings = ["myst.header"]


class CliHelp(Directive):
    """``.. galgen-cli-help:: <stage>``: the ``--help`` text of a subcommand, at build time."""

    required_arguments = 1

    def run(self):
        from galgen.cli import build_parser

        parser = build_parser()
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        text = sub.choices[self.arguments[0]].format_help()
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


class SurveyTable(Directive):
    """``.. galgen-survey-table::``: the survey presets of ``surveys.yaml`` as a table."""

    def run(self):
        data = yaml.safe_load((ROOT / "galgen" / "simulate" / "surveys.yaml").read_text())
        cols = ["preset", "band", "pixel scale (\")", "zero point", "gain (e-/ADU)", "read noise (e-)",
                "sky (mag/\"^2)", "PSF"]
        table = nodes.table()
        group = nodes.tgroup(cols=len(cols))
        table += group
        group.extend(nodes.colspec(colwidth=1) for _ in cols)
        head = nodes.thead()
        group += head
        row = nodes.row()
        for c in cols:
            row += nodes.entry("", nodes.paragraph(text=c))
        head += row
        body = nodes.tbody()
        group += body
        for name, s in data.items():
            psf = s["psf"]
            desc = f"{psf['model']}, FWHM {psf['fwhm']}\""
            if psf.get("beta"):
                desc += f", beta {psf['beta']}"
            values = [name, s["band"], s["pixel_scale"], s["zero_point"], s["gain"], s["read_noise"],
                      s["sky_mag"], desc]
            row = nodes.row()
            for v in values:
                row += nodes.entry("", nodes.paragraph(text=str(v)))
            body += row
        return [table]


def setup(app):
    directives.register_directive("galgen-cli-help", CliHelp)
    directives.register_directive("galgen-survey-table", SurveyTable)
