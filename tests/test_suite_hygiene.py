"""The suite runs on a fresh clone: no test module reaches the shared data except through conftest's
shared_data fixture, which skips the test where the data are missing."""
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
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\d+ passed, 1 skipped", proc.stdout), proc.stdout
    assert "needs the shared photos" in proc.stdout and "set RLHF_SHARED_DATA" in proc.stdout, proc.stdout
