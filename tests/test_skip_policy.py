"""The CI skip policy of tests/conftest.py: in CI a skip fails unless it is a GPU/platform skip.

Bug caught: a test that needs a missing data file or package passing CI by skipping silently.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

SAMPLE = '''
import pytest

@pytest.mark.skipif(True, reason="requires CUDA: no device")
def test_gpu_only():
    pass

def test_missing_module():
    pytest.importorskip("no_such_module_hiermem_xyz")

def test_missing_file():
    pytest.skip("data file missing")

@pytest.mark.xfail(reason="known", strict=True)
def test_xfail():
    assert False

def test_ok():
    pass
'''

MODULE_SKIP = '''
import pytest
pytest.importorskip("no_such_module_hiermem_xyz")

def test_never_runs():
    pass
'''


def _run(tmp_path, env_extra, text=SAMPLE):
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "HIERMEM_CI", "HIERMEM_CI_ALLOWED_SKIPS")}
    env.update(env_extra)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return done.stdout.splitlines()[-1], done


@pytest.mark.parametrize("ci", [{"CI": "1"}, {"CI": "true"}, {"HIERMEM_CI": "1"}])
def test_in_ci_a_silent_skip_fails(tmp_path, ci):
    summary, done = _run(tmp_path, ci)
    assert done.returncode != 0
    # the missing module and the missing file fail; the GPU skip stays a skip, the xfail an xfail
    assert "2 failed" in summary and "1 skipped" in summary and "1 xfailed" in summary, done.stdout
    assert "skipped in CI" in done.stdout and "data file missing" in done.stdout
    # a module-level importorskip is a collection error (the whole run fails)
    summary, done = _run(tmp_path, ci, MODULE_SKIP)
    assert done.returncode != 0 and "1 error" in summary, done.stdout


def test_outside_ci_skips_stay_skips_and_extra_prefixes_are_allowed(tmp_path):
    summary, done = _run(tmp_path, {})
    assert done.returncode == 0 and "3 skipped" in summary, done.stdout
    summary, done = _run(tmp_path, {}, MODULE_SKIP)
    assert done.returncode in (0, 5) and "1 skipped" in summary, done.stdout  # 5: no test ran
    summary, done = _run(tmp_path, {"CI": "1", "HIERMEM_CI_ALLOWED_SKIPS": "data file, could not import"})
    assert done.returncode == 0 and "3 skipped" in summary, done.stdout


def test_ci_entry_point_turns_the_policy_on():
    """`.ci/run` must set CI, or the policy above never applies where it matters."""
    text = (HERE.parent / ".ci" / "run").read_text()
    assert "export CI=1" in text
