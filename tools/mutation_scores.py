"""Per-module mutation scores from a mutmut run (see docs/development.md).

Reads what `mutmut run` recorded beside the mutants (`mutants/src/**/*.meta`) and the
equivalent mutants listed with their reasons in `tools/equivalent_mutants.toml`, and
prints one row per module:

    python tools/mutation_scores.py            # a Markdown table
    python tools/mutation_scores.py --survivors treeglob._core.pattern
    mutmut run $(python tools/mutation_scores.py --sample 30)   # 30 unrun mutants a module

A sample is drawn at random (seeded) from the mutants not run yet of each module, so that
a module too slow to run whole is measured without the bias of mutmut's order, which
runs a module's functions one after the other.

A module's score is killed / (run - equivalent): a timeout counts as killed (the mutant
changed behaviour enough to loop or stall), a mutant no test reaches counts as survived.

An equivalent mutant is listed by its name and the change it makes (its changed lines as
they read mutated). mutmut numbers a function's mutants again when the function changes,
so a name alone may come to mean another mutation: one whose change differs from the
listed one is reported and scored as any other mutant until it is looked at again.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import random
import sys
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# mutmut's exit codes (mutmut/stats.py), grouped the way the score reads them.
KILLED = {
    1: "killed",
    # 2: pytest stopped on an error while collecting the tests, the mutant having broken code
    # a test module runs at import (mutmut shows it as interrupted). A run stopped by hand
    # leaves 2 on the mutants it was running, too: run those again before reading the table.
    2: "killed",
    3: "killed",
    36: "timeout",
    -24: "timeout",
    24: "timeout",
    152: "timeout",
    255: "timeout",
}
SURVIVED = {0: "survived", 5: "no tests", 33: "no tests"}
NOT_RUN = {None}


def outcomes(mutants: Path) -> dict[str, dict[str, int | None]]:
    """Exit code of every mutant, by module name."""
    by_module = {}
    for meta in sorted((mutants / "src").rglob("*.py.meta")):
        module = ".".join(meta.relative_to(mutants / "src").with_suffix("").with_suffix("").parts)
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if codes:
            by_module[module.removesuffix(".__init__")] = codes
    return by_module


def equivalent(path: Path) -> dict[str, dict[str, str]]:
    """Equivalent mutant name -> `{"change": the lines it changes, as they read mutated,
    "why": why no test can tell it from the original}`."""
    table = tomllib.loads(path.read_text()) if path.exists() else {}
    return {f"{module}.{name}": entry for module, names in table.items() for name, entry in names.items()}


def changes(mutants: Path, module: str) -> dict[str, str]:
    """What each mutant of `module` changes: its lines that differ from the original
    function's, stripped and joined. mutmut writes each mutant as a function of the mutated
    module, `<function>__mutmut_<n>` beside `<function>__mutmut_orig`."""
    source = mutants / "src" / Path(*module.split("."))
    path = source / "__init__.py" if source.is_dir() else source.with_suffix(".py")
    lines = path.read_text().splitlines()
    bodies = {
        node.name: lines[node.lineno : node.end_lineno]  # the body: the def line holds the name
        for node in ast.walk(ast.parse("\n".join(lines)))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and "__mutmut_" in node.name
    }
    found = {}
    for name, body in bodies.items():
        function, _, number = name.rpartition("__mutmut_")
        if number != "orig" and f"{function}__mutmut_orig" in bodies:
            diff = difflib.ndiff(bodies[f"{function}__mutmut_orig"], body)
            found[f"{module}.{name}"] = " ".join(line[2:].strip() for line in diff if line.startswith("+ "))
    return found


def sample(by_module: dict[str, dict[str, int | None]], count: int, rng: random.Random) -> list[str]:
    """Up to `count` mutants of each module that have not run, drawn at random."""
    names = []
    for codes in by_module.values():
        unrun = sorted(name for name, code in codes.items() if code in NOT_RUN)
        names += rng.sample(unrun, min(count, len(unrun)))
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=ROOT / "mutants")
    parser.add_argument("--equivalent", type=Path, default=ROOT / "tools" / "equivalent_mutants.toml")
    parser.add_argument(
        "--survivors",
        metavar="MODULE",
        help="list the non-equivalent survivors of MODULE, with their changes",
    )
    parser.add_argument(
        "--sample", type=int, metavar="N", help="print N unrun mutants of each module, at random"
    )
    parser.add_argument("--seed", type=int, default=0, help="the seed of --sample")
    args = parser.parse_args(argv)
    by_module = outcomes(args.mutants)
    if args.sample:
        print(" ".join(sample(by_module, args.sample, random.Random(args.seed))))
        return 0
    mutated: dict[str, dict[str, str]] = {}  # each module's changes, read once

    def changes_of(module: str) -> dict[str, str]:
        if module not in mutated:
            mutated[module] = changes(args.mutants, module) if module in by_module else {}
        return mutated[module]

    known = {}  # the listed equivalents that still make the change their reason was written for
    for name, entry in equivalent(args.equivalent).items():
        now = changes_of(name.rpartition(".")[0]).get(name)
        if now == entry["change"]:
            known[name] = entry["why"]
        else:  # numbered again after its function changed, or gone: its reason may not hold
            found = "is not a mutant" if now is None else f"now changes {now!r}"
            print(f"{name} {found}, not {entry['change']!r}: look at it again", file=sys.stderr)
    if args.survivors:
        for name, code in by_module[args.survivors].items():
            if code in SURVIVED and name not in known:
                print(f"{name} {SURVIVED[code]}: {changes_of(args.survivors).get(name, '?')}")
        return 0
    print("| module | mutants | run | killed | timeout | equivalent | survived | no tests | score |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for module, codes in by_module.items():
        count = Counter(
            KILLED.get(code) or SURVIVED.get(code) or ("not run" if code in NOT_RUN else "suspicious")
            for code in codes.values()
        )
        equivalents = sum(1 for name, code in codes.items() if name in known and code in SURVIVED)
        run = len(codes) - count["not run"]
        killed = count["killed"] + count["timeout"]
        scored = run - equivalents
        score = f"{100 * killed / scored:.1f}%" if scored else "-"
        print(
            f"| {module} | {len(codes)} | {run} | {count['killed']} | {count['timeout']} | {equivalents} "
            f"| {count['survived'] - equivalents} | {count['no tests']} | {score} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
