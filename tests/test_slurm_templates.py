"""The SLURM templates in ``pipelines/slurm/``: valid bash, and every galgen command in them parses.

Each ``galgen ...`` command line of a template, in its script and in the usage examples
of its header (comment lines indented ``#   command``), is joined across line
continuations, its shell variables are replaced (``${N:-50000}`` by its default,
``${X:+word}`` by ``word``, others by a stand-in value) and its arguments are parsed by
:func:`galgen.cli.build_parser`, so that a renamed or removed flag breaks this test.
The arguments of ``torchrun`` are parsed by torchrun's own parser.
"""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from galgen.cli import build_parser

SLURM = Path(__file__).resolve().parents[1] / "pipelines" / "slurm"
TEMPLATES = sorted(SLURM.glob("*.sbatch"))
#: stand-ins for variables that have no default in the templates (set by SLURM or by the script)
ENV = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "12345", "SLURM_CPUS_PER_TASK": "8",
       "SLURM_GPUS_ON_NODE": "4", "NSHARDS": "64", "head": "node001", "jid": "12345"}
#: programs whose command lines are checked: the galgen ones, and those that start galgen
COMMANDS = ("galgen", "torchrun", "srun", "python", "sbatch")


def expand(text: str) -> str:
    """Replace the shell parameter expansions of ``text`` as the test's contract says."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                if j >= len(text):
                    raise AssertionError(f"unbalanced ${{ in {text!r}")
                if text.startswith("${", j):
                    depth, j = depth + 1, j + 2
                    continue
                depth -= text[j] == "}"
                j += 1
            body = text[i + 2:j - 1]
            m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-=+?])(.*))?", body, re.S)
            if m is None:
                raise AssertionError(f"unsupported expansion ${{{body}}} (arrays and the like cannot be checked)")
            name, op, word = m.groups()
            if op in (":-", "-", ":=", "=", ":+", "+"):
                out.append(expand(word))
            else:
                out.append(ENV.get(name, "1"))
            i = j
        elif text.startswith("$(", i):
            raise AssertionError(f"command substitution in a checked command line: {text!r}")
        elif text[i] == "$" and (m := re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)", text[i:])):
            out.append(ENV.get(m.group(1), "1"))
            i += m.end()
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def command_lines(path: Path):
    """(line number, joined command line) of every command worth checking in a template."""
    code, comments = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith(("#!", "#SBATCH", "##SBATCH")):
            continue
        if line.lstrip().startswith("#"):
            body = line.lstrip()[1:]
            # usage examples are indented ("#   galgen merge ..."); "# galgen ..." is prose
            comments.append((n, body.strip() if body.startswith("  ") or comments and comments[-1][1].endswith("\\")
                             else "# " + body.strip()))
        else:
            code.append((n, line.strip()))
    found = []
    for stream, examples_only in ((code, False), (comments, True)):
        pending, start = "", None
        for n, line in stream:
            if start is None:
                start = n
            pending += line
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            words = pending.split()
            if words and (not examples_only or words[0] in COMMANDS):
                found.append((start, pending))
            pending, start = "", None
    return [(n, cmd) for n, cmd in found if re.search(r"(^|[\s/])galgen(\s|$)", cmd)]


def galgen_argv(tokens):
    """The arguments given to galgen in a command's tokens (after ``galgen`` or ``-m galgen``)."""
    at = next(i for i, t in enumerate(tokens) if t == "galgen" or t.endswith("/galgen"))
    argv = tokens[at + 1:]
    for stop in ("|", "&&", "||", ";", ">", "2>", ")"):
        if stop in argv:
            argv = argv[:argv.index(stop)]
    return argv


def test_templates_exist():
    names = {p.name for p in TEMPLATES}
    assert {"simulate_array.sbatch", "fit_array.sbatch", "merge_fits.sbatch", "evaluate.sbatch",
            "train_torchrun.sbatch", "train_torchrun_multinode.sbatch"} <= names


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_template_is_valid_bash(path):
    run = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_every_galgen_command_line_parses(path):
    lines = command_lines(path)
    assert any(not cmd.lstrip().startswith("sbatch") for _, cmd in lines), f"{path.name}: no galgen command found"
    parser = build_parser()
    for n, cmd in lines:
        tokens = shlex.split(expand(cmd), comments=True)
        if tokens[0] == "sbatch" or "galgen" not in [t.rsplit("/", 1)[-1] for t in tokens]:
            continue  # `sbatch ... pipelines/slurm/x.sbatch`: submits a template, runs no galgen itself
        argv = galgen_argv(tokens)
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{path.name}:{n}: galgen rejects {shlex.join(argv)!r}")
        assert args.command in cmd
        if "torchrun" in tokens:
            from torch.distributed.run import get_args_parser

            run_args = tokens[tokens.index("torchrun") + 1:]
            try:
                ns = get_args_parser().parse_args(run_args)
            except SystemExit:
                pytest.fail(f"{path.name}:{n}: torchrun rejects {shlex.join(run_args)!r}")
            assert ns.module and ns.training_script == "galgen", f"{path.name}:{n}: torchrun must run -m galgen"


def test_the_checker_expands_and_finds_what_it_should(tmp_path):
    assert expand('--n "${N:-50000}" --out "x_${SURVEY:-sdss}_{k}of{N}.h5"') == '--n "50000" --out "x_sdss_{k}of{N}.h5"'
    assert expand('${STEPS:+--steps "$STEPS"} ${RESUME:+--resume} "$OUT"') == '--steps "1" --resume "1"'
    assert expand('--shard "${SLURM_ARRAY_TASK_ID}/${NSHARDS:?set it}"') == '--shard "3/64"'
    t = tmp_path / "t.sbatch"
    t.write_text("#!/bin/bash\n# usage:\n#   galgen merge a.h5 \\\n#       --out b.h5\n# galgen prose is skipped\n"
                 "#SBATCH --job-name=galgen-x\ngalgen -v fit --model sersic \\\n    --data d.h5 --out f.h5  # note\n")
    found = command_lines(t)
    assert [n for n, _ in found] == [7, 3]
    assert [galgen_argv(shlex.split(expand(c), comments=True)) for _, c in found] == [
        ["-v", "fit", "--model", "sersic", "--data", "d.h5", "--out", "f.h5"], ["merge", "a.h5", "--out", "b.h5"]]
    with pytest.raises(SystemExit):  # a renamed flag is caught
        build_parser().parse_args(galgen_argv(shlex.split("galgen fit --modle sersic --data d --out f")))
