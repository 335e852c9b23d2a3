"""Package list only (everything else is in pyproject.toml): the top-level `patches/` folder is
installed as `hf_paged.patches`, so installing hf_paged never adds a top-level `patches` module."""

from setuptools import find_packages, setup

PATCHES = [name.replace("patches", "hf_paged.patches", 1) for name in find_packages(include=["patches", "patches.*"])]

setup(
    packages=find_packages(include=["hf_paged", "hf_paged.*"]) + PATCHES,
    package_dir={"hf_paged.patches": "patches"},
)
