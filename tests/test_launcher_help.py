"""Every script's --help prints its examples as written: a single backslash at the end of a
docstring line is a Python line continuation, which joins the example's two lines into one
(make_shards.py and train_tokenizer.py printed them that way); examples must write ``\\\\``."""
import ast
import glob
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _docstring_source(path):
    with open(path) as f:
        source = f.read()
    node = ast.parse(source).body[0]
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
        return None
    lines = source.splitlines(keepends=True)
    return "".join(lines[node.lineno - 1:node.end_lineno])


def test_no_script_docstring_joins_lines():
    scripts = sorted(glob.glob(os.path.join(REPO, "launchers", "*.py"))
                     + glob.glob(os.path.join(REPO, "benchmarks", "*.py")))
    assert len(scripts) > 10
    joined = []
    for path in scripts:
        doc = _docstring_source(path)
        if doc and not doc.lstrip().startswith(("r\"\"\"", "r'''")):
            joined += [f"{os.path.relpath(path, REPO)}: {line.strip()}" for line in doc.splitlines()
                       if re.search(r"(?<!\\)\\$", line)]
    assert joined == [], "\n".join(joined)


def test_make_shards_help_prints_the_continuation():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launchers", "make_shards.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "--label-column label \\\n        --class-names classes.txt" in proc.stdout
