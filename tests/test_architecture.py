"""The layer rules of docs/architecture.rst, read from the source with ``ast``.

Every ``import`` and ``from ... import`` of every module under ``galgen/`` counts, at the
top of a module or inside a function; relative imports are resolved to absolute
``galgen.x.y`` names. ``from package import name`` imports the submodule
``package.name`` when there is one, else the name from ``package``.

The rules (one test case each, listing every violation as ``module:line imports name``):

* ``galgen.physics.*`` imports no galgen module except ``galgen.errors`` (and itself);
* ``galgen.models.*`` imports nothing of data, train, inference, evaluation, cli;
* ``galgen.data.*`` imports nothing of models, train, inference;
* ``galgen.inference.*`` and ``galgen.evaluation.*`` import nothing of train;
* only ``galgen.cli`` and ``galgen.__main__`` import ``galgen.cli``;
* no module imports a private name (``_x``, not a dunder such as ``__version__``) of
  another galgen module; importing a private *module* (``galgen._version``) is fine.

And inference and evaluation use a model only through the latent-model contract: no
``hasattr(...)``, no ``getattr(model, ...)``, no comparison of a model ``kind`` with a
string.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "galgen"


# -- the checker -----------------------------------------------------------------------

@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. galgen.physics.observation
    line: int
    target: str  # the imported module, absolute, e.g. galgen.physics.convolve
    name: str | None  # the name imported from ``target`` (None: the module itself)

    @property
    def imported(self) -> str:
        return self.target if self.name is None else f"{self.target}.{self.name}"

    def __str__(self):
        return f"{self.module}:{self.line} imports {self.imported}"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def galgen_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """``{module name: path}`` of every module under ``galgen/``."""
    return {module_name(p): p for p in sorted(package.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module of ``from <level dots><name> import ...`` in ``module``."""
    if level == 0:
        return name or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(parts) - 1:
        raise ValueError(f"{module}: relative import beyond the top-level package")
    base = parts[:len(parts) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports(source: str, module: str, *, is_package: bool = False, known: set[str] | frozenset = frozenset()):
    """Every import of ``source`` (module ``module``), top-level and local, resolved.

    Parameters
    ----------
    source : str
    module : str
        Dotted name of the module the source is.
    is_package : bool
        Whether it is a package's ``__init__`` (relative imports start at the package).
    known : set of str
        Module names: ``from p import n`` with ``p.n`` in ``known`` imports module ``p.n``.
    """
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend(Import(module, node.lineno, a.name, None) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node.level, node.module)
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in known:
                    out.append(Import(module, node.lineno, sub, None))
                else:
                    out.append(Import(module, node.lineno, target, a.name))
    return sorted(out, key=lambda i: (i.module, i.line, i.imported))


def all_imports(package: Path = PACKAGE) -> list[Import]:
    mods = galgen_modules(package)
    known = set(mods)
    out = []
    for name, path in mods.items():
        out.extend(imports(path.read_text(), name, is_package=path.name == "__init__.py", known=known))
    return out


def _within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _physics(i):
    return (_within(i.module, "galgen.physics") and _within(i.target, "galgen")
            and not _within(i.target, "galgen.errors", "galgen.physics"))


def _forbidden(importers, targets):
    return lambda i: _within(i.module, *importers) and _within(i.target, *targets)


def _cli(i):
    return _within(i.target, "galgen.cli") and i.module not in ("galgen.cli", "galgen.__main__")


def _private(i):
    return (i.name is not None and _is_private(i.name) and _within(i.target, "galgen")
            and i.target != i.module)


RULES = {
    "physics imports only galgen.errors": _physics,
    "models import nothing of data, train, inference, evaluation, cli": _forbidden(
        ["galgen.models"], ["galgen.data", "galgen.train", "galgen.inference", "galgen.evaluation", "galgen.cli"]),
    "data imports nothing of models, train, inference": _forbidden(
        ["galgen.data"], ["galgen.models", "galgen.train", "galgen.inference"]),
    "inference and evaluation import nothing of train": _forbidden(
        ["galgen.inference", "galgen.evaluation"], ["galgen.train"]),
    "only cli and __main__ import galgen.cli": _cli,
    "no module imports another module's private names": _private,
}


def violations(rule, found):
    return [str(i) for i in found if RULES[rule](i)]


# -- model probes in inference and evaluation ------------------------------------------

_MODELISH = re.compile(r"model|vae|gan|decoder|encoder|net", re.IGNORECASE)


def _names(expr):
    """Identifiers of a Name / Attribute / Subscript chain (``self.model.prior`` -> self, model, prior)."""
    while True:
        if isinstance(expr, ast.Attribute):
            yield expr.attr
            expr = expr.value
        elif isinstance(expr, ast.Subscript):
            expr = expr.value
        elif isinstance(expr, ast.Call):
            expr = expr.func
        elif isinstance(expr, ast.Name):
            yield expr.id
            return
        else:
            return


def _is_modelish(expr):
    return any(_MODELISH.search(n) for n in _names(expr))


def _is_kind(expr):
    """``kind``, ``x.kind``, ``x["kind"]``, ``getattr(x, "kind", ...)``."""
    if isinstance(expr, ast.Name):
        return expr.id == "kind" or expr.id.endswith("_kind")
    if isinstance(expr, ast.Attribute):
        return expr.attr == "kind" or expr.attr.endswith("_kind")
    if isinstance(expr, ast.Subscript):
        key = expr.slice
        return isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value in ("kind", "model_kind")
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "getattr":
        return (len(expr.args) >= 2 and isinstance(expr.args[1], ast.Constant)
                and expr.args[1].value in ("kind", "model_kind"))
    return False


def _is_strings(expr):
    if isinstance(expr, ast.Constant):
        return isinstance(expr.value, str)
    if isinstance(expr, (ast.Tuple, ast.List, ast.Set)):
        return bool(expr.elts) and all(_is_strings(e) for e in expr.elts)
    return False


def model_probes(source: str, filename: str) -> list[str]:
    """``file:line what`` for each ``hasattr(``, ``getattr(<model>, ...)`` and kind-string comparison."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "hasattr":
                what = ast.unparse(node.args[0]) if node.args else ""
                out.append((node.lineno, node.col_offset, f"hasattr({what}, ...)"))
            elif node.func.id == "getattr" and node.args and _is_modelish(node.args[0]):
                out.append((node.lineno, node.col_offset, f"getattr({ast.unparse(node.args[0])}, ...)"))
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_is_kind(s) for s in sides) and any(_is_strings(s) for s in sides):
                out.append((node.lineno, node.col_offset, f"kind compared with a string: {ast.unparse(node)}"))
    return [f"{filename}:{line} {what}" for line, _, what in sorted(out)]


# -- the tests -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def found():
    return all_imports()


@pytest.mark.parametrize("rule", RULES)
def test_layer_rule(rule, found):
    bad = violations(rule, found)
    assert not bad, f"{rule}: {len(bad)} violation(s)\n" + "\n".join(bad)


def test_inference_and_evaluation_use_models_only_through_the_contract():
    bad = []
    for sub in ("inference", "evaluation"):
        for path in sorted((PACKAGE / sub).rglob("*.py")):
            bad += model_probes(path.read_text(), str(path.relative_to(ROOT)))
    assert not bad, f"{len(bad)} model probe(s) outside the latent-model contract\n" + "\n".join(bad)


# -- the checker itself ----------------------------------------------------------------

KNOWN = {"galgen", "galgen.errors", "galgen.data", "galgen.data.cutouts", "galgen.physics",
         "galgen.physics.convolve", "galgen.physics.observation", "galgen._version", "galgen.cli"}


def test_checker_finds_a_local_relative_import_into_a_forbidden_layer():
    src = "import torch\nfrom ..errors import GalgenInputError\n\ndef f():\n    from ..data import x\n    return x\n"
    found = imports(src, "galgen.physics.observation", known=KNOWN)
    assert [str(i) for i in found] == ["galgen.physics.observation:1 imports torch",
                                       "galgen.physics.observation:2 imports galgen.errors.GalgenInputError",
                                       "galgen.physics.observation:5 imports galgen.data.x"]
    assert violations("physics imports only galgen.errors", found) == [
        "galgen.physics.observation:5 imports galgen.data.x"]


def test_checker_resolves_relative_imports():
    src = ("from . import convolve\nfrom .convolve import _crop_kernel, convolve\nfrom .. import data\n"
           "from ..data.cutouts import CutoutFile\nimport galgen.cli\nfrom .._version import __version__\n"
           "from .. import _version\n")
    got = [i.imported for i in imports(src, "galgen.physics", is_package=True, known=KNOWN)]
    assert got == ["galgen.physics.convolve", "galgen.physics.convolve._crop_kernel",
                   "galgen.physics.convolve.convolve", "galgen.data", "galgen.data.cutouts.CutoutFile",
                   "galgen.cli", "galgen._version.__version__", "galgen._version"]
    # in a module (not a package), one dot is the module's package
    (i,) = imports("from .convolve import pixelate\n", "galgen.physics.observation", known=KNOWN)
    assert i.target == "galgen.physics.convolve" and i.name == "pixelate"
    (i,) = imports("from ...errors import E\n", "galgen.inference.mcmc.hmc", known=KNOWN)
    assert i.target == "galgen.errors"


def test_checker_finds_private_names_and_cli_imports_but_not_dunders_or_private_modules():
    src = ("from .convolve import _crop_kernel\nfrom .._version import __version__\nfrom .. import _version\n"
           "def g():\n    from ..cli import main\n")
    found = imports(src, "galgen.physics.observation", known=KNOWN)
    assert violations("no module imports another module's private names", found) == [
        "galgen.physics.observation:1 imports galgen.physics.convolve._crop_kernel"]
    assert violations("only cli and __main__ import galgen.cli", found) == [
        "galgen.physics.observation:5 imports galgen.cli.main"]
    ok = imports("from .cli import main\n", "galgen.__main__", known=KNOWN)
    assert violations("only cli and __main__ import galgen.cli", ok) == []
    # a private name of the module itself, and of third-party modules, are not this rule's business
    assert violations("no module imports another module's private names",
                      imports("from argparse import _SubParsersAction\n", "galgen.cli", known=KNOWN)) == []


def test_checker_finds_model_probes():
    src = ("def f(model, observation, kind, cfg):\n"
           "    if hasattr(model, 'encode'):\n"
           "        pass\n"
           "    p = getattr(model.prior, 'fitted', False)\n"
           "    m = getattr(observation.noise, 'mask', None)\n"
           "    if model.kind == 'vae' or kind in ('ae', 'vae') or cfg['kind'] != 'wgan-gp':\n"
           "        pass\n"
           "    if getattr(model, 'kind', None) == 'wgan-gp':\n"
           "        pass\n"
           "    return f'{model.kind}-1', sampler == 'hmc'\n")
    assert model_probes(src, "x.py") == [
        "x.py:2 hasattr(model, ...)",
        "x.py:4 getattr(model.prior, ...)",
        "x.py:6 kind compared with a string: model.kind == 'vae'",
        "x.py:6 kind compared with a string: kind in ('ae', 'vae')",
        "x.py:6 kind compared with a string: cfg['kind'] != 'wgan-gp'",
        "x.py:8 getattr(model, ...)",
        "x.py:8 kind compared with a string: getattr(model, 'kind', None) == 'wgan-gp'",
    ]


def test_every_module_is_read():
    mods = galgen_modules()
    assert {"galgen", "galgen.__main__", "galgen.physics.noise", "galgen.inference.map"} <= set(mods)
    assert all(_within(m, "galgen") for m in mods)
