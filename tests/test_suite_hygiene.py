"""The suite runs on a fresh clone: no test module reaches the shared data except through conftest's
shared_data fixture, which skips the test where the data are missing. And the tool's modules keep to the
sizes STYLE.md asks: no class over CLASS_LINES lines, no function over FUNCTION_LINES."""
import ast
import glob
import os
import re
import subprocess
import sys

from conftest import ROOT

TESTS = os.path.join(ROOT, "tests")
# Any way of naming the shared folder: the variable, a path with a "shared" component, or the bare name
# given to os.path.join.
SHARED_PATH = re.compile(r"RLHF_SHARED_DATA|(^|[/\\])shared([/\\]|$)")
CLASS_LINES = 300    # a class that holds more has more than one job
FUNCTION_LINES = 60  # about one screen: a longer function is not read in one go


def shared_mentions(tree):
    """(line, text) of every string in the module that names the shared data, docstrings left out."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            and SHARED_PATH.search(node.value)]


def parse(path):
    with open(path) as f:
        return ast.parse(f.read(), path)


def long_definitions(node, prefix=""):
    """'Class.method: N lines' for every class under node longer than CLASS_LINES and every function or
    method longer than FUNCTION_LINES, nested ones included."""
    found = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = child.end_lineno - child.lineno + 1
            if lines > (CLASS_LINES if isinstance(child, ast.ClassDef) else FUNCTION_LINES):
                found.append(f"{prefix}{child.name}: {lines} lines")
            found += long_definitions(child, f"{prefix}{child.name}.")
        else:
            found += long_definitions(child, prefix)
    return found


def test_no_test_module_names_the_shared_data():
    # This module is left out: its pattern names the shared folder in order to look for it.
    offenders = {}
    for path in sorted(glob.glob(os.path.join(TESTS, "*.py"))):
        if os.path.basename(path) not in ("conftest.py", os.path.basename(__file__)):
            found = shared_mentions(parse(path))
            if found:
                offenders[os.path.basename(path)] = found
    assert not offenders, f"ask for the shared_data fixture instead (it skips without the data): {offenders}"


def test_conftest_names_the_shared_data_only_in_the_fixture_that_skips():
    tree = parse(os.path.join(TESTS, "conftest.py"))
    fixture, = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "shared_data"]
    inside = {line for line, _ in shared_mentions(fixture)}
    assert inside, "shared_data no longer names the shared folder"
    outside = [(line, text) for line, text in shared_mentions(tree) if line not in inside]
    assert not outside, outside
    skips = [node for node in ast.walk(fixture) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "skip"]
    assert skips, "shared_data must skip the test where the data are missing"


def test_without_the_shared_data_tests_run_and_those_that_need_it_skip_saying_what_to_set(tmp_path):
    # As on a fresh clone: test_dataset.py holds both kinds of test.
    env = {**os.environ, "RLHF_SHARED_DATA": str(tmp_path / "nowhere")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "-n", "0", "--basetemp", str(tmp_path / "inner"), os.path.join(TESTS, "test_dataset.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\d+ passed, 1 skipped", proc.stdout), proc.stdout
    assert "needs the shared photos" in proc.stdout and "set RLHF_SHARED_DATA" in proc.stdout, proc.stdout


def test_no_class_of_the_tool_over_300_lines_and_no_function_over_60():
    # The repository's own modules, not tests/ or bench/: a long test reads top to bottom as one story.
    offenders = [f"{os.path.basename(path)}: {found}" for path in sorted(glob.glob(os.path.join(ROOT, "*.py")))
                 for found in long_definitions(parse(path))]
    assert not offenders, (f"split these (at most {CLASS_LINES} lines a class, {FUNCTION_LINES} a function):\n"
                           + "\n".join(offenders))
