"""Every script in scripts/ imports and answers --help: a script that no other test runs end to end
cannot break silently (scripts/fp8_accuracy.py once failed at import for a whole stop)."""

import contextlib
import io

import pytest

from script_runs import ROOT, load_script

SCRIPTS = sorted(path for path in (ROOT / "scripts").glob("*.py"))
ENTRY_POINTS = [path for path in SCRIPTS if not path.name.startswith("_")]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.name)
def test_imports(path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # the scripts import their _helpers from there
    load_script(path, f"hf_paged_script_{path.stem}")


@pytest.mark.parametrize("path", ENTRY_POINTS, ids=lambda path: path.name)
def test_entry_point_answers_help(path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    module = load_script(path, f"hf_paged_script_{path.stem}")
    out = io.StringIO()
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stdout(out):
        module.main(["--help"])
    assert exit_info.value.code == 0 and "usage:" in out.getvalue()
