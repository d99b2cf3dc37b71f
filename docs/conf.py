"""Sphinx configuration for galgen (numpydoc + autosummary + MyST for Markdown pages).

Built offline (no intersphinx, no remote images) with ``make docs``, which runs
``sphinx -W --keep-going``: every warning fails the build. Three pieces of the pages are
generated from the code at build time, so that they cannot drift from it:

* ``.. galgen-cli-help:: <stage>`` renders ``galgen <stage> --help`` from
  :func:`galgen.cli.build_parser` (no argument: ``galgen --help``); a subcommand of the
  parser that no such directive documents is a build warning.
* ``.. galgen-survey-table::`` and ``.. galgen-survey-sources::`` render the presets of
  ``galgen/simulate/surveys.yaml`` as validated by :func:`galgen.simulate.load_survey`.
* A public class or function (in the ``__all__`` of a module of :data:`API_MODULES`) that
  ``api.rst`` does not list is a build warning.
"""

import contextlib
import importlib
import os
import re
import sys
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import Directive
from sphinx.util import logging as sphinx_logging

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
exclude_patterns = ["_build", "figures/*.md"]  # report pages kept beside their figures, linked as files
templates_path = []

# API pages: autosummary writes one stub per listed object into api/generated/
# (gitignored); numpydoc renders the docstrings. Class members are documented by
# autodoc's "members" option, so numpydoc's own member tables would duplicate them.
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "inherited-members": False}
autodoc_typehints = "none"          # numpydoc's "Parameters" sections carry the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

myst_heading_anchors = 3
myst_enable_extensions = []

html_theme = "alabaster"
html_static_path = []
html_title = f"galgen {release}"
suppress_warnings = ["myst.header"]

#: Modules whose public classes and functions ``api.rst`` must list.
API_MODULES = (
    "galgen.simulate", "galgen.data", "galgen.data.store", "galgen.data.cutouts", "galgen.data.merge",
    "galgen.data.ingest", "galgen.data.loading", "galgen.data.fitfile", "galgen.physics", "galgen.physics.sersic", "galgen.models",
    "galgen.train", "galgen.train.config", "galgen.train.logs", "galgen.train.trainer", "galgen.train.run",
    "galgen.inference.map", "galgen.inference.lm", "galgen.inference.importance", "galgen.inference.hmc",
    "galgen.inference.diagnostics",
    "galgen.inference.fit", "galgen.inference.derived", "galgen.inference.calibration",
    "galgen.models.parametric", "galgen.evaluation", "galgen.pipeline", "galgen.plotting", "galgen.sharding",
    "galgen.errors", "galgen.cli", "galgen.runtime", "galgen.checkpoints",
)

#: Width of the rendered ``--help`` texts (argparse wraps to the terminal otherwise).
CLI_HELP_COLUMNS = 88

_log = sphinx_logging.getLogger("galgen.docs")


# -- the CLI ---------------------------------------------------------------------------

@contextlib.contextmanager
def _columns(width):
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _subcommands():
    from galgen.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return parser, sub.choices


def _literal(text, language="text"):
    block = nodes.literal_block(text, text)
    block["language"] = language
    return block


class CliHelp(Directive):
    """``.. galgen-cli-help:: [stage]``: ``galgen [stage] --help``, generated at build time."""

    optional_arguments = 1

    def run(self):
        env = self.state.document.settings.env
        env.note_dependency(str(ROOT / "galgen" / "cli.py"))
        with _columns(CLI_HELP_COLUMNS):
            parser, choices = _subcommands()
            if not self.arguments:
                return [_literal(parser.format_help())]
            name = self.arguments[0]
            if name not in choices:
                raise self.error(f"galgen-cli-help: no subcommand {name!r}; the parser has {sorted(choices)}")
            text = choices[name].format_help()
        if not hasattr(env, "galgen_cli_documented"):
            env.galgen_cli_documented = {}  # docname -> subcommands documented there
        env.galgen_cli_documented.setdefault(env.docname, set()).add(name)
        return [_literal(text)]


def _check_cli(app, env):
    """Warn about subcommands of the parser that no ``galgen-cli-help`` documents."""
    _, choices = _subcommands()
    documented = set().union(*getattr(env, "galgen_cli_documented", {}).values())
    missing = sorted(set(choices) - documented)
    if missing:
        _log.warning("docs/cli.rst: subcommand(s) %s of galgen.cli.build_parser() have no "
                     "'.. galgen-cli-help::' section", ", ".join(missing))


def _purge_cli(app, env, docname):
    getattr(env, "galgen_cli_documented", {}).pop(docname, None)


def _merge_cli(app, env, docnames, other):
    if not hasattr(env, "galgen_cli_documented"):
        env.galgen_cli_documented = {}
    for docname, names in getattr(other, "galgen_cli_documented", {}).items():
        if docname in docnames:
            env.galgen_cli_documented[docname] = names


# -- the survey presets ----------------------------------------------------------------

def _table(header, rows, widths=None):
    table = nodes.table()
    group = nodes.tgroup(cols=len(header))
    table += group
    for w in widths or [1] * len(header):
        group += nodes.colspec(colwidth=w)
    head = nodes.thead()
    group += head
    row = nodes.row()
    for c in header:
        row += nodes.entry("", nodes.paragraph(text=c))
    head += row
    body = nodes.tbody()
    group += body
    for values in rows:
        row = nodes.row()
        for v in values:
            row += nodes.entry("", nodes.paragraph(text=str(v)))
        body += row
    return table


def _presets(directive):
    from galgen.simulate import available_surveys, load_survey

    env = directive.state.document.settings.env
    env.note_dependency(str(ROOT / "galgen" / "simulate" / "surveys.yaml"))
    env.note_dependency(str(ROOT / "galgen" / "simulate" / "surveys.py"))
    return [load_survey(name) for name in available_surveys()]


def _psf_text(psf):
    if psf.model == "airy":
        text = (f"Airy, lambda {psf.lam_nm:g} nm, D {psf.diam_m:g} m, obscuration {psf.obscuration:g} "
                f"(FWHM ~{psf.fwhm:g} arcsec)")
    else:
        text = f"{psf.model.capitalize()}, FWHM {psf.fwhm:g} arcsec"
        if psf.model == "moffat":
            text += f", beta {psf.beta:g}"
        if psf.fwhm_scatter:
            lo, hi = psf.fwhm_range
            text += f"; sigma(ln FWHM) {psf.fwhm_scatter:g}, clipped to [{lo:g}, {hi:g}] arcsec"
    if psf.g_rms:
        text += f"; PSF shear rms {psf.g_rms:g}"
    return text


class SurveyTable(Directive):
    """``.. galgen-survey-table::``: the bundled survey presets as a table."""

    def run(self):
        header = ["preset", "band", "pixel scale (arcsec/pix)", "zero point (AB mag, 1 ADU)", "gain (e-/ADU)",
                  "read noise (e-)", "sky (AB mag/arcsec²)", "sky (ADU/pix)", "empty-pixel sigma (ADU)",
                  "PSF", "catalog"]
        rows = []
        for s in _presets(self):
            rows.append([s.name, s.band, f"{s.pixel_scale:g}", f"{s.zero_point:g}", f"{s.gain:g}",
                         f"{s.read_noise:g}", f"{s.sky_mag:g}", f"{s.sky_level:.4g}",
                         f"{s.sky_variance ** 0.5:.3g}", _psf_text(s.psf), s.catalog])
        return [_table(header, rows, widths=[6, 4, 5, 6, 5, 5, 6, 6, 6, 20, 10])]


class SurveySources(Directive):
    """``.. galgen-survey-sources::``: description and literature sources of each preset."""

    def run(self):
        out = nodes.bullet_list()
        for s in _presets(self):
            item = nodes.list_item()
            para = nodes.paragraph()
            para += nodes.literal(text=s.name)
            para += nodes.Text(f": {s.description}.")
            item += para
            sources = nodes.bullet_list()
            for src in s.sources:
                if isinstance(src, dict):  # an unquoted "text: more" in YAML is a mapping
                    src = "; ".join(f"{k}: {v}" for k, v in src.items())
                sub = nodes.list_item()
                sub += nodes.paragraph(text=str(src))
                sources += sub
            item += sources
            out += item
        return [out]


# -- the cutout schema -----------------------------------------------------------------

class SchemaDatasets(Directive):
    """``.. galgen-schema-datasets::``: the datasets of :data:`galgen.data.DATASETS`."""

    def run(self):
        from galgen.data import DATASETS, REQUIRED_DATASETS

        self.state.document.settings.env.note_dependency(str(ROOT / "galgen" / "data" / "cutouts.py"))
        rows = []
        for key, (dtype, unit, grid, meaning) in DATASETS.items():
            if key == "psf":
                shape = "(N, P, P)"
            else:
                shape = "(N, S*k, S*k)" if grid == "intrinsic" else "(N, S, S)"
            scale = "pixel_scale / k" if grid == "intrinsic" else "pixel_scale"
            rows.append([key, shape, dtype, unit or "-", scale,
                         "yes" if key in REQUIRED_DATASETS else "no", meaning])
        header = ["dataset", "shape", "dtype", "unit", "grid scale", "always present", "content"]
        return [_table(header, rows, widths=[8, 9, 5, 4, 8, 5, 25])]


#: Meaning of the simulator's truth-catalog columns (the others are the population's).
TRUTH_COLUMNS = {
    "index": "global galaxy index in the (unsharded) run; its random generator is seeded by (seed, index)",
    "catalog_id": "``id`` of the population-catalog row the galaxy was made from",
    "beta": "position angle of the major axes after the galaxy's random rotation, from +x towards +y",
    "g1_disk": "reduced-shear ellipticity component of the disk: ``g_disk * cos(2 beta)``",
    "g2_disk": "``g_disk * sin(2 beta)``",
    "g1_bulge": "``g_bulge * cos(2 beta)``",
    "g2_bulge": "``g_bulge * sin(2 beta)``",
    "flux": "total flux of the galaxy, ``10**(-0.4 (mag - zero_point))``",
    "psf_fwhm": "FWHM of this galaxy's PSF (drawn from the survey's distribution)",
    "psf_g1": "reduced-shear ellipticity of the PSF, component 1",
    "psf_g2": "reduced-shear ellipticity of the PSF, component 2",
    "knot_seed": "seed of the knot positions (``galsim.RandomKnots``)",
    "noise_seed": "seed of the noise realisation (``galsim.CCDNoise``)",
    "psf_flux_in_stamp": "fraction of the PSF's light on its stored P x P grid (before normalisation)",
    "knot_radius": "largest distance of a (sheared) knot centre from the galaxy centre; 0 without knots",
    "r_extent": "radius along the major axis beyond which the galaxy has no light (truncations, knots)",
    "fits_stamp": "``r_extent + 3 psf_fwhm`` lies within the stamp: the whole observed galaxy is in it",
    "sky_level": "sky level subtracted from the image (contributes noise)",
    "gain": "detector gain",
    "read_noise": "read noise rms per pixel",
}


def _truth_catalog():
    """The truth catalog of a 2-galaxy simulation (run once per build, ~1 s)."""
    import tempfile

    from astropy.table import Table

    from galgen.simulate import simulate

    with tempfile.TemporaryDirectory() as tmp:
        path = simulate(Path(tmp) / "truth.h5", survey="sdss", n=2, stamp=16, seed=0, progress=False)
        return Table.read(path, path="catalog")


class TruthColumns(Directive):
    """``.. galgen-truth-columns::``: the columns of a simulated file's catalog."""

    def run(self):
        from galgen.simulate import CATALOG_COLUMNS

        env = self.state.document.settings.env
        for name in ("simulator.py", "render.py", "population.py"):
            env.note_dependency(str(ROOT / "galgen" / "simulate" / name))
        cat = _truth_catalog()
        rows = []
        for name in cat.colnames:
            col = cat[name]
            unit = str(col.unit) if col.unit is not None else "-"
            if name in TRUTH_COLUMNS:
                meaning = TRUTH_COLUMNS[name]
            elif name in CATALOG_COLUMNS:
                meaning = CATALOG_COLUMNS[name][1] + " (population catalog)"
            else:
                _log.warning("docs/conf.py: simulated catalog column %r has no entry in TRUTH_COLUMNS", name)
                meaning = col.description or ""
            rows.append([name, unit, col.dtype.name, meaning])
        for name in sorted(set(TRUTH_COLUMNS) - set(cat.colnames)):
            _log.warning("docs/conf.py: TRUTH_COLUMNS documents %r, which simulated catalogs no longer have", name)
        return [_inline_literals(_table(["column", "unit", "dtype", "meaning"], rows, widths=[6, 6, 4, 30]))]


def _inline_literals(node):
    """Turn ``double-backquoted`` text of table paragraphs into literal nodes."""
    for para in list(node.findall(nodes.paragraph)):
        text = para.astext()
        if "``" not in text:
            continue
        para.children = []
        for i, part in enumerate(text.split("``")):
            if part:
                para += nodes.literal(text=part) if i % 2 else nodes.Text(part)
    return node


# -- API coverage ----------------------------------------------------------------------

def _check_api(app, env):
    """Warn about public classes and functions that ``api.rst`` does not list."""
    text = (Path(app.srcdir) / "api.rst").read_text()
    listed = set()
    current = "galgen"
    in_summary = False
    for line in text.splitlines():
        m = re.match(r"\.\.\s+currentmodule::\s*(\S+)", line)
        if m:
            current = m.group(1)
            continue
        if line.startswith(".. autosummary::"):
            in_summary = True
            continue
        if in_summary:
            if line and not line[0].isspace():
                in_summary = False
                continue
            entry = line.strip()
            if not entry or entry.startswith(":"):
                continue
            name = entry if entry.startswith("galgen.") else f"{current}.{entry}"
            obj = _resolve(name)
            if obj is None:
                _log.warning("docs/api.rst: %s does not import", name)
            else:
                listed.add(id(obj))
    for modname in API_MODULES:
        try:
            mod = importlib.import_module(modname)
        except Exception as exc:  # noqa: BLE001 - report any import failure as a warning
            _log.warning("docs/conf.py: cannot import %s (%s)", modname, exc)
            continue
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name, None)
            if (isinstance(obj, type) or callable(obj)) and id(obj) not in listed:
                _log.warning("docs/api.rst: %s.%s is public (in __all__) but not listed", modname, name)


def _resolve(dotted):
    """The object named ``dotted``: attributes first (``galgen.physics.convolve`` is the
    function, not the submodule of the same name), submodules when there is no attribute."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, attr in enumerate(parts[1:], start=2):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                return None
    return obj


def _check(app, env):
    _check_cli(app, env)
    _check_api(app, env)


def setup(app):
    app.add_directive("galgen-cli-help", CliHelp)
    app.add_directive("galgen-survey-table", SurveyTable)
    app.add_directive("galgen-survey-sources", SurveySources)
    app.add_directive("galgen-schema-datasets", SchemaDatasets)
    app.add_directive("galgen-truth-columns", TruthColumns)
    app.connect("env-purge-doc", _purge_cli)
    app.connect("env-merge-info", _merge_cli)
    app.connect("env-check-consistency", _check)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
