"""Build hook: cythonize ext/*.pyx into helix_async._ext.

Everything else about the package lives in pyproject.toml. With HELIX_NO_EXTENSIONS=1 no
extension is built and the pure-Python twins are used; otherwise a failed compile fails the
install (never a silent fallback).
"""

import glob
import os

from setuptools import Extension, setup


def _extensions() -> list:
    # Same rule as helix_async/envs.py: unset, "", 0, false, no, off mean "build the extensions".
    raw = os.environ.get("HELIX_NO_EXTENSIONS", "").strip().lower()
    if raw not in ("", "0", "false", "no", "off"):
        return []
    from Cython.Build import cythonize

    exts = []
    for pyx in sorted(glob.glob(os.path.join("ext", "*.pyx"))):
        mod = os.path.splitext(os.path.basename(pyx))[0]
        exts.append(
            Extension(
                f"helix_async._ext.{mod}",
                [pyx],
                include_dirs=["ext"],
                extra_compile_args=["-O3", "-ffp-contract=off"],
            )
        )
    return cythonize(
        exts,
        language_level=3,
    )


setup(ext_modules=_extensions())
