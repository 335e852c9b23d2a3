"""The default model's text: the Python standard library's own source, less a held-out set of modules.

Every Python install has it, so the model trains and is evaluated without a download. The held-out
modules are never trained on (tokenizer included); scripts/make_default_data.py makes the built-in
evaluation task from them and scripts/perplexity.py measures the model on them.
"""

import sysconfig
from pathlib import Path

# Held out from training, by module name (a module file or a package folder of the stdlib root).
HELD_OUT_MODULES = (
    "bisect", "calendar", "colorsys", "difflib", "fnmatch", "fractions", "gettext", "glob", "graphlib",
    "heapq", "ipaddress", "sched", "shlex", "statistics", "textwrap",
)
# Never read: tests (their files name the held-out modules' behaviour), third-party packages,
# generated tables (codec maps, pydoc's help text), byte caches.
EXCLUDED_PARTS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}
)


def stdlib_dir() -> Path:
    """The running interpreter's standard library folder (`sysconfig.get_paths()["stdlib"]`)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_excluded(path: Path, root: Path) -> bool:
    return bool(EXCLUDED_PARTS & set(path.relative_to(root).parts))


def module_files(name: str, root: Path | None = None) -> list[Path]:
    """The .py files of stdlib module `name` (its file, or every file of its package), sorted."""
    root = stdlib_dir() if root is None else root
    if (root / f"{name}.py").is_file():
        return [root / f"{name}.py"]
    if (root / name).is_dir():
        return sorted(path for path in (root / name).rglob("*.py") if not _is_excluded(path, root))
    raise FileNotFoundError(f"no stdlib module {name!r} under {root}")


def training_files(root: Path | None = None) -> list[Path]:
    """Every .py file the model trains on: the stdlib less HELD_OUT_MODULES and EXCLUDED_PARTS, sorted."""
    root = stdlib_dir() if root is None else root
    held_out = {path for name in HELD_OUT_MODULES for path in module_files(name, root)}
    return sorted(path for path in root.rglob("*.py") if not _is_excluded(path, root) and path not in held_out)


def read_source(path: Path) -> str | None:
    """A file's text, or None when it is not UTF-8 (a few stdlib files test other encodings)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None
