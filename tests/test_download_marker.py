"""The tests that download are marked `download`: the default run deselects them, `-m download` selects them.

Collection only (no test runs, nothing is downloaded), in one subprocess started from the repository root, so
the pytest configuration in pyproject.toml applies as it does to `python -m pytest tests -q`; both
collections share that process's imports (~10 s in all on 2 cores).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "tests/test_models_smollm2.py"
SMOLLM2_TESTS = [f"{SMOLLM2}::test_sparse_finds_the_needle_dense_finds_in_noise",
                 f"{SMOLLM2}::test_sparse_finds_the_needle_dense_finds_in_prose"]

COLLECT = """
import json, sys
import pytest

class Record:
    def __init__(self):
        self.selected, self.deselected = [], []
    def pytest_deselected(self, items):
        self.deselected += [item.nodeid for item in items]
    def pytest_collection_finish(self, session):
        self.selected = [item.nodeid for item in session.items]

result = {}
for name, args in (("default", []), ("download", ["-m", "download"])):
    record = Record()
    code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args, sys.argv[1]], plugins=[record])
    result[name] = {"code": int(code), "selected": record.selected, "deselected": record.deselected}
print("RESULT " + json.dumps(result))
"""


def test_the_download_tests_are_deselected_by_default_and_selected_by_dash_m_download():
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    proc = subprocess.run([sys.executable, "-c", COLLECT, SMOLLM2], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"collection failed:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(lines[-1].removeprefix("RESULT "))
    default, download = result["default"], result["download"]
    # exit 5 = no tests collected: the default run deselects every test of the file
    assert default == {"code": 5, "selected": [], "deselected": SMOLLM2_TESTS}, \
        f"`python -m pytest` without -m did not deselect the SmolLM2 tests (is the marker applied?):\n{proc.stdout}"
    assert download == {"code": 0, "selected": SMOLLM2_TESTS, "deselected": []}, \
        f"`-m download` did not select the SmolLM2 tests (is the marker registered?):\n{proc.stdout}"
