"""What `pip install hf_paged` brings: wrap() needs neither the evaluation's nor the tests' packages."""

import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EVAL_ONLY = ("accelerate", "datasets", "tqdm")
NOT_IMPORTED = ("accelerate", "datasets")  # tqdm comes with transformers anyway


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower() for requirement in requirements}


def test_evaluation_packages_are_an_extra_not_a_dependency():
    assert not names(project()["dependencies"]) & set(EVAL_ONLY)
    extras = project()["optional-dependencies"]
    assert set(EVAL_ONLY) <= names(extras["eval"]) and set(EVAL_ONLY) <= names(extras["test"])


def test_the_readme_and_ci_install_the_eval_extra():
    """The README's first command runs the main job (scripts/eval.py): it must install the extra."""
    readme = (ROOT / "README.md").read_text()
    first = next(line for line in readme.splitlines() if line.startswith("pip install"))
    assert '".[eval,test]"' in first and first.endswith("python scripts/eval.py")
    assert 'pip install -q -e ".[eval,test]"' in (ROOT / ".ci" / "run").read_text()


@pytest.mark.subprocess
def test_wrap_and_generate_work_without_the_evaluation_packages():
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in NOT_IMPORTED)  # `import name` then fails
    code = (
        f"import sys; {blocked}\n"
        "import torch, hf_paged\n"
        "sys.path.insert(0, 'tests'); from tiny import tiny_model\n"
        "model = hf_paged.wrap(tiny_model('llama'), num_pages=32, page_size=4)\n"
        "out = model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, pad_token_id=0)\n"
        f"assert not {{m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}} & {set(NOT_IMPORTED)!r}\n"
        "print(out.shape[1])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "5"
