"""tools/mutation_scores.py: the per-module scores of docs/development.md, from mutmut's records."""

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import mutation_scores  # noqa: E402

MUTATED = """
def x_f__mutmut_orig(a):
    return a + 1

def x_f__mutmut_1(a):
    return a - 1

def x_f__mutmut_2(a):
    return a + 2

def x_f__mutmut_3(a):
    return a + 1.0

def x_f__mutmut_4(a):
    return a + 1

def x_f__mutmut_5(a):
    return None

def x_f__mutmut_6(a):
    return a * 1
"""


def test_scores_count_timeouts_as_killed_and_leave_out_equivalents(tmp_path, capsys):
    meta = tmp_path / "mutants" / "src" / "pkg" / "mod.py.meta"
    meta.parent.mkdir(parents=True)
    (meta.parent / "mod.py").write_text(MUTATED)
    codes = {"pkg.mod.x_f__mutmut_1": 2, "pkg.mod.x_f__mutmut_2": -24, "pkg.mod.x_f__mutmut_3": 0}
    codes |= {"pkg.mod.x_f__mutmut_4": 0, "pkg.mod.x_f__mutmut_5": 33, "pkg.mod.x_f__mutmut_6": None}
    meta.write_text(json.dumps({"exit_code_by_key": codes}))
    equivalent = tmp_path / "equivalent.toml"
    equivalent.write_text(
        '["pkg.mod"]\n'
        'x_f__mutmut_3 = { change = "return a + 1.0", why = "a float is as good" }\n'
        'x_f__mutmut_4 = { change = "return a + 2", why = "renumbered since" }\n'
        'x_g__mutmut_1 = { change = "pass", why = "gone" }\n'
    )
    args = ["--mutants", str(tmp_path / "mutants"), "--equivalent", str(equivalent)]
    assert mutation_scores.main(args) == 0
    out, err = capsys.readouterr()
    # 6 mutants, 5 run: killed 1 (a collection error, 2) + timeout 1 of 5 - 1 equivalent; a mutant
    # no test reaches survives.
    assert out.splitlines()[-1] == "| pkg.mod | 6 | 5 | 1 | 1 | 1 | 1 | 1 | 50.0% |"
    # A listed equivalent whose change differs is scored as any mutant, and reported.
    assert err.splitlines() == [
        "pkg.mod.x_f__mutmut_4 now changes '', not 'return a + 2': look at it again",
        "pkg.mod.x_g__mutmut_1 is not a mutant, not 'pass': look at it again",
    ]
    assert mutation_scores.main([*args, "--survivors", "pkg.mod"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "pkg.mod.x_f__mutmut_4 survived: ",
        "pkg.mod.x_f__mutmut_5 no tests: return None",
    ]


def test_a_mutant_s_change_is_its_lines_that_differ(tmp_path):
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "__init__.py").write_text(
        MUTATED + "\nclass C:\n    def xǁCǁm__mutmut_orig(self):\n        return [1,\n 2]\n"
        "    def xǁCǁm__mutmut_1(self):\n        return [1,\n 3]\n"
    )
    assert mutation_scores.changes(tmp_path, "pkg") == {
        "pkg.x_f__mutmut_1": "return a - 1",
        "pkg.x_f__mutmut_2": "return a + 2",
        "pkg.x_f__mutmut_3": "return a + 1.0",
        "pkg.x_f__mutmut_4": "",
        "pkg.x_f__mutmut_5": "return None",
        "pkg.x_f__mutmut_6": "return a * 1",
        "pkg.xǁCǁm__mutmut_1": "3]",
    }


def test_a_sample_draws_only_unrun_mutants_of_each_module(tmp_path, capsys):
    for module, codes in {
        "a": {"pkg.a.x_f__mutmut_1": 1, "pkg.a.x_f__mutmut_2": None, "pkg.a.x_f__mutmut_3": None},
        "b": {f"pkg.b.x_g__mutmut_{i}": None for i in range(1, 11)},
    }.items():
        meta = tmp_path / "mutants" / "src" / "pkg" / f"{module}.py.meta"
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"exit_code_by_key": codes}))
    args = ["--mutants", str(tmp_path / "mutants"), "--sample", "3"]
    assert mutation_scores.main(args) == 0
    drawn = capsys.readouterr().out.split()
    # Module a has two mutants left to run, b has ten.
    assert sorted(drawn[:2]) == ["pkg.a.x_f__mutmut_2", "pkg.a.x_f__mutmut_3"]
    assert len(set(drawn[2:])) == 3 and all(name.startswith("pkg.b.") for name in drawn[2:])
    assert mutation_scores.main(args) == 0
    assert capsys.readouterr().out.split() == drawn  # seeded: the same sample again
    assert mutation_scores.main([*args, "--seed", "1"]) == 0
    assert capsys.readouterr().out.split() != drawn
