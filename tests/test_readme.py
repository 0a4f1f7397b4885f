"""README.md reads in five minutes, and every command in it runs as written; so does every command of docs/usage.md.

The commands are those of the ```sh blocks and the inline `make ...`, `python ...` and `SCRIPT.py --...` spans.
Nothing is built: a make command must pass `make -n` with its variables (its targets are rules, its variables ones
the Makefile uses, and the flags in PREPARE_ARGS, TRAIN_ARGS and SUBMIT_ARGS options of their scripts); a script
command may use only options its `--help` lists. Every relative link, repository path in a code span (docs/,
bench/, lib/, tests/, a script, a test named with ::), `lib.module.name` and `FILE.md "## heading"` must exist,
in bench/README.md too."""
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, ROOT / "docs" / "usage.md"]
CITING = DOCS + [ROOT / "bench" / "README.md"]  # whose references are checked (its commands are of their time)
README_MAX_BYTES = 12_000
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`]+)`")
COMMAND_SPAN = re.compile(r"(make|python3?) |[\w/-]+\.py -")
LINK = re.compile(r"\]\(([^)\s]+)\)")
PATH_SPAN = re.compile(r"(?:(?:docs|bench|lib|tests|\.ci)/[\w./-]+|[\w-]+\.py)(?:::(\w+))?")
NAME_SPAN = re.compile(r"lib\.(\w+)(?:\.(\w+))?")
HEADING_REF = re.compile(r"([\w./-]+\.md)\)?,? \"(#+ [^\"]+)\"")
MAKE_ARGS = {"PREPARE_ARGS": "prepare.py", "TRAIN_ARGS": "train.py", "SUBMIT_ARGS": "submit.py"}
PASSED_ON = {"bench/bench_models.py": "train.py"}  # its arguments after -- are train.py's
SEPARATORS = {"|", "||", "&&", ";", "&"}


def spans(text):
    """The inline code spans outside the fenced blocks, a span broken over lines joined into one."""
    return [" ".join(span.split()) for span in SPAN.findall(FENCE.sub("", text))]


def commands(text):
    """The command lines of the ```sh blocks (continuation lines joined) and the command spans outside any block."""
    lines = []
    for language, block in FENCE.findall(text):
        if language == "sh":
            lines += [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return lines + [span for span in spans(text) if COMMAND_SPAN.match(span)]


def simple_commands(line):
    """The simple commands of a shell line: words split as the shell does, leading VAR=value assignments dropped."""
    words = shlex.split(line, comments=True)
    parts, part = [], []
    for word in words + [";"]:
        if word in SEPARATORS:
            while part and re.fullmatch(r"\w+=.*", part[0]):
                part.pop(0)
            if part:
                parts.append(part)
            part = []
        else:
            part.append(word)
    return parts


@cache
def help_text(script):
    """`python SCRIPT --help` (or `python -m MODULE --help`) of this checkout, at full width; None if it fails."""
    argv = ["-m", script[3:]] if script.startswith("-m ") else [script]
    result = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COLUMNS": "1000"})
    return result.stdout if result.returncode == 0 else None


def options(script):
    """The option strings a script's --help lists, or None when it has no working --help."""
    text = help_text(script)
    return None if text is None else set(re.findall(r"(?<![\w-])--[A-Za-z0-9][\w-]*", text))


def option_problems(script, words, where):
    """`where`: the --options among `words` that `script` does not have (or the script itself when it is missing)."""
    known = options(script)
    if known is None:
        return [f"{where}: `python {script} --help` fails: no such script or module"]
    return [f"{where}: {script} has no option {word.split('=')[0]}" for word in words
            if word.startswith("--") and word != "--" and word.split("=")[0] not in known]


def script_of(words):
    """(script, its arguments) of a python command (`-m MODULE` for a module), or None for another program."""
    if words[0] in ("python", "python3") and len(words) > 1:
        return ("-m " + words[2], words[3:]) if words[1] == "-m" else (words[1], words[2:])
    if words[0].endswith(".py"):
        return words[0], words[1:]
    return None


def make_problems(words, where):
    """A make command: `make -n` accepts its targets and variables; *_ARGS hold options of their scripts."""
    settings = [word for word in words[1:] if "=" in word]
    makefile = (ROOT / "Makefile").read_text()
    problems = [f"{where}: the Makefile uses no variable {name}" for name in (s.split("=")[0] for s in settings)
                if not re.search(rf"\b{name}\b", makefile)]
    for setting in settings:
        name, value = setting.split("=", 1)
        if name in MAKE_ARGS:
            problems += option_problems(MAKE_ARGS[name], shlex.split(value), where)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    result = subprocess.run(["make", "-n", "--no-print-directory", *words[1:]], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        problems.append(f"{where}: make -n fails: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return problems


def command_problems(line):
    """What in one command line would not run as written."""
    problems = []
    for words in simple_commands(line):
        where = f"`{' '.join(words)}`"
        if words[0] == "make":
            problems += make_problems(words, where)
        elif (found := script_of(words)) is not None:
            script, arguments = found
            if script in PASSED_ON and "--" in arguments:
                cut = arguments.index("--")
                problems += option_problems(PASSED_ON[script], arguments[cut + 1:], where)
                arguments = arguments[:cut]
            problems += option_problems(script, arguments, where)
    return problems


def reference_problems(path, text):
    """Links, repository paths, lib names and "## heading" references of `text` (the file `path`) that do not exist."""
    problems = []
    for target in LINK.findall(text):
        if not re.match(r"\w+:", target) and not (path.parent / target.split("#")[0]).exists():
            problems.append(f"link {target}: no such file")
    for span in spans(text):
        if (found := PATH_SPAN.fullmatch(span)) is not None:
            file = ROOT / span.split("::")[0]
            if not file.exists():
                problems.append(f"`{span}`: no such file")
            elif found[1] and not re.search(rf"def {found[1]}\b", file.read_text()):
                problems.append(f"`{span}`: no test {found[1]} in {file.name}")
        elif (found := NAME_SPAN.fullmatch(span)) is not None:
            module = ROOT / "lib" / f"{found[1]}.py"
            if not module.exists():
                problems.append(f"`{span}`: no module lib/{found[1]}.py")
            elif found[2] and not re.search(rf"(def|class) {found[2]}\b|^{found[2]}\s*[:=]", module.read_text(), re.M):
                problems.append(f"`{span}`: lib/{found[1]}.py defines no {found[2]}")
    for name, heading in HEADING_REF.findall(text):
        file = next((f for f in (path.parent / name, ROOT / name) if f.is_file()), None)
        if file is None or heading not in file.read_text().splitlines():
            problems.append(f"{name} \"{heading}\": no such heading")
    return problems


def all_commands():
    return [line for doc in DOCS for line in commands(doc.read_text())]


def test_readme_reads_in_five_minutes():
    size = len(README.read_bytes())
    assert size < README_MAX_BYTES, f"README.md is {size} bytes; the detail belongs in docs/usage.md"


def test_every_link_path_and_heading_exists():
    problems = [f"{doc.relative_to(ROOT)}: {p}" for doc in CITING for p in reference_problems(doc, doc.read_text())]
    assert not problems, "\n".join(problems)


def test_the_checks_find_what_does_not_exist(tmp_path):
    doc = tmp_path / "README.md"
    text = ("[usage](docs/nothing.md) `lib/nothing.py` `tests/test_rle.py::test_nothing` `lib.rle.nothing`\n"
            'bench/README.md "## nothing"\n')
    assert reference_problems(doc, text) == [
        "link docs/nothing.md: no such file", "`lib/nothing.py`: no such file",
        "`tests/test_rle.py::test_nothing`: no test test_nothing in test_rle.py",
        "`lib.rle.nothing`: lib/rle.py defines no nothing", 'bench/README.md "## nothing": no such heading']
    text = "```sh\nmake demo NOTHING=1  # a comment\nX=1 python -m lib.synth data/x --size 9 | cat\n```\n`make lint`\n"
    assert commands(text) == ["make demo NOTHING=1  # a comment", "X=1 python -m lib.synth data/x --size 9 | cat",
                              "make lint"]
    assert simple_commands(commands(text)[1]) == [["python", "-m", "lib.synth", "data/x", "--size", "9"], ["cat"]]
    [problem] = command_problems("make nothing-such")
    assert problem.startswith("`make nothing-such`: make -n fails:") and "nothing-such" in problem.split(":", 1)[1]
    assert command_problems("make demo NOTHING=1") == ["`make demo NOTHING=1`: the Makefile uses no variable NOTHING"]


@pytest.mark.slow
@pytest.mark.e2e
def test_every_command_runs_as_written():
    """Every make command passes `make -n`, every script option is in the script's --help (all run at once)."""
    lines = all_commands()
    assert any(line.startswith("make demo") for line in lines) and any("train.py" in line for line in lines)
    found = [script_of(words) for line in lines for words in simple_commands(line)]
    scripts = {script for script, _ in filter(None, found)} | set(MAKE_ARGS.values()) | set(PASSED_ON.values())
    with ThreadPoolExecutor(len(scripts)) as pool:  # each --help once, all at once: train.py's imports take seconds
        list(pool.map(help_text, scripts))
    problems = [p for line in lines for p in command_problems(line)]
    assert not problems, "\n".join(problems)
    assert command_problems("python train.py --stores S --no-such-option") == [
        "`python train.py --stores S --no-such-option`: train.py has no option --no-such-option"]
    assert command_problems("make train TRAIN_ARGS='--epochs 1 --no-such-option'") == [
        "`make train TRAIN_ARGS=--epochs 1 --no-such-option`: train.py has no option --no-such-option"]
    assert command_problems("python bench/bench_models.py --levels hard -- --no-such-option") == [
        "`python bench/bench_models.py --levels hard -- --no-such-option`: train.py has no option --no-such-option"]
    assert command_problems("python nothing.py --x") == ["`python nothing.py --x`: `python nothing.py --help` fails: "
                                                         "no such script or module"]
