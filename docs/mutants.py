"""docs/mutants.py -- would the tests notice a wrong token?

    python docs/mutants.py                           # 100 sampled mutants in each of the four modules
    python docs/mutants.py machinery.py --sample 60 --seed 1
    python docs/mutants.py tasks.py --sample 0       # every mutant of the file

A mutant is the code with one token changed, the way a slip of the
keyboard changes it: an operator into its neighbour (+ and -, * and /, <
and <=, == and !=, ...), a number into the next one (an integer n into
n + 1, a float x into 2 x), True and False, `and` and `or`, min and max.
Docstrings and comments are left alone.

The unchanged copy of the repository runs the README's test command
(`python -m pytest -q test_roa.py test_run.py`) first, under coverage.py
with one context per test: if it fails or times out, no score would mean
anything, and the script stops in one line; if it passes, it tells which
tests execute each line. Each mutant then runs, stopping at the first
failure, the tests that execute its line (the whole suite where no test
does in-process: a line run at import, or only in a subprocess); it is
*killed* when a test fails, *timed out* when the run passes --timeout
(counted apart: a cut run proves nothing), and it *survives* when they
pass. A survivor is either a gap in the tests or an equivalent mutant
(a change that computes the same thing, such as `<` into `<=` where the
two values are never equal): the list printed at the end is for a person
to read and tell them apart.
"""

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ["autograd.py", "roa.py", "tasks.py", "machinery.py"]
TESTS = ["test_roa.py", "test_run.py"]

SWAPS = {"+": "-", "-": "+", "*": "/", "/": "*", "//": "/", "**": "*", "%": "//",
         "<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "==",
         "+=": "-=", "-=": "+=", "*=": "/=", "/=": "*=",
         "True": "False", "False": "True", "and": "or", "or": "and", "min": "max", "max": "min"}


def next_number(text):
    """The number a slip would make of this literal, or None."""
    try:
        value = int(text, 0)
        return str(value + 1)
    except ValueError:
        pass
    try:
        value = float(text)
        return repr(2 * value if value else 1.0)       # (0.0 into 1.0: doubling would change nothing)
    except ValueError:
        return None         # complex literals and the like


def mutants(path):
    """Every one-token change of the file: (line, column, old, new)."""
    with open(path) as f:
        tokens = list(tokenize.generate_tokens(f.readline))
    found = []
    for tok in tokens:
        if tok.type in (tokenize.OP, tokenize.NAME) and tok.string in SWAPS:
            found.append((*tok.start, tok.string, SWAPS[tok.string]))
        elif tok.type == tokenize.NUMBER:
            new = next_number(tok.string)
            if new is not None:
                found.append((*tok.start, tok.string, new))
    return found


def apply(source_lines, mutant):
    """The source with the mutant's token replaced."""
    line, col, old, new = mutant
    lines = list(source_lines)
    text = lines[line - 1]
    assert text[col:col + len(old)] == old
    lines[line - 1] = text[:col] + new + text[col + len(old):]
    return "".join(lines)


def compiles(text):
    try:
        compile(text, "<mutant>", "exec")
        return True
    except SyntaxError:
        return False


def run_tests(work, timeout, tests=TESTS, coverage=False):
    """The tests (files, or test ids such as test_run.py::test_x) in the folder
    `work`, stopping at the first failure -- or, with coverage, all of them
    under coverage.py with one context per test: "passed", "failed" (with the
    first failing test's name) or "timed out"."""
    command = ["-m", "coverage", "run", "--rcfile", os.path.join(work, ".mutants-coveragerc"), "-m", "pytest"] \
        if coverage else ["-m", "pytest", "-x"]
    try:
        run = subprocess.run([sys.executable, *command, "-q", "-p", "no:cacheprovider", *tests],
                             cwd=work, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timed out"
    failed = [line.split()[1] for line in run.stdout.splitlines() if line.startswith("FAILED")]
    return "passed" if run.returncode == 0 else "failed" + (f" ({failed[0]})" if failed else "")


def tests_by_line(work, module):
    """{line: the ids of the tests that execute it} of a module, from the
    unchanged run's coverage data (a context "test_run.test_x" is the test
    test_run.py::test_x, with all its parameters)."""
    import coverage
    data = coverage.CoverageData(os.path.join(work, ".mutants-coverage"))
    data.read()
    contexts = data.contexts_by_lineno(os.path.join(work, module))
    return {line: sorted({"{}.py::{}".format(*name.split(".", 1)) for name in names if "." in name})
            for line, names in contexts.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("modules", nargs="*", default=MODULES, help=f"files to mutate (default: {' '.join(MODULES)})")
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (see --help)\n")   # one line
    p.add_argument("--sample", type=int, default=100, help="mutants per file, drawn at random; 0: all")
    p.add_argument("--seed", type=int, default=0, help="the draw of the sample")
    p.add_argument("--timeout", type=float, default=600, help="seconds for one run of the tests")
    args = p.parse_args()
    missing = [module for module in args.modules if not os.path.isfile(os.path.join(ROOT, module))]
    if missing:
        p.error(f"no such file in the repository: {', '.join(missing)} (give paths such as roa.py)")

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        p.error(f"{ROOT} is not a git checkout: the files to copy are the ones git tracks")
    work = tempfile.mkdtemp(prefix="roa-mutants-")
    for name in tracked.stdout.split():
        os.makedirs(os.path.join(work, os.path.dirname(name)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), os.path.join(work, name))
    git = os.path.join(ROOT, ".git")                          # (the suite runs this script too, in the copy)
    (shutil.copytree if os.path.isdir(git) else shutil.copy2)(git, os.path.join(work, ".git"))
    if os.path.isdir(os.path.join(ROOT, "data")):             # MNIST, where it was fetched: no download per run
        os.symlink(os.path.join(ROOT, "data"), os.path.join(work, "data"))

    with open(os.path.join(work, ".mutants-coveragerc"), "w") as f:
        f.write(f"[run]\ndynamic_context = test_function\ndata_file = {os.path.join(work, '.mutants-coverage')}\n")
    totals = []
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))    # (the copy is removed below)
    try:
        unchanged = run_tests(work, args.timeout, coverage=True)
        if unchanged != "passed":
            print(f"mutants.py: the unchanged tests {unchanged}"
                  + (f" (--timeout {args.timeout:g} s)" if unchanged == "timed out" else "")
                  + ": no mutant can be scored; fix the tests or give a longer --timeout", file=sys.stderr)
            sys.exit(2)
        for module in args.modules:
            path = os.path.join(work, module)
            with open(path) as f:
                source_lines = f.readlines()
            candidates = [m for m in mutants(path) if compiles(apply(source_lines, m))]
            chosen = candidates if args.sample == 0 else random.Random(args.seed).sample(
                candidates, min(args.sample, len(candidates)))
            outcomes, survivors, covering = [], [], tests_by_line(work, module)
            for mutant in sorted(chosen):
                with open(path, "w") as f:
                    f.write(apply(source_lines, mutant))
                outcome = {"failed": "killed", "passed": "SURVIVED", "timed out": "timed out"}[
                    run_tests(work, args.timeout, covering.get(mutant[0]) or TESTS).split(" (")[0]]
                line, col, old, new = mutant
                print(f"{module}:{line}:{col}: {old} -> {new}: {outcome}", flush=True)
                outcomes.append(outcome)
                if outcome == "SURVIVED":
                    survivors.append(f"{module}:{line}: {old} -> {new}   | {source_lines[line - 1].strip()}")
            with open(path, "w") as f:
                f.writelines(source_lines)
            totals.append((module, outcomes.count("killed"), outcomes.count("timed out"), len(chosen),
                           len(candidates), survivors))
    finally:
        shutil.rmtree(work)

    print("\nmodule | killed / scored (a test failed) | timed out (not scored) | mutants in the file")
    for module, killed, timed_out, run, possible, _ in totals:
        scored = run - timed_out
        print(f"{module} | {killed} / {scored} ({100 * killed / max(scored, 1):.0f} %) | {timed_out} | {possible}")
    print("\nsurvivors (a gap in the tests, or an equivalent change):")
    for *_, survivors in totals:
        for line in survivors:
            print("  " + line)


if __name__ == "__main__":
    main()
