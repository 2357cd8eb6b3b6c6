"""Build hook: cythonize ext/*.pyx into helix_async._ext, and compile the simulator's hot pure-Python
modules (the worker, the in-memory network) unchanged into helix_async._ext with the C types of
their ``helix_async/_ext/<name>.pxd``.

Everything else about the package lives in pyproject.toml. With HELIX_NO_EXTENSIONS=1 no
extension is built and the pure-Python twins are used; otherwise a failed compile fails the
install (never a silent fallback).
"""

import glob
import os

from setuptools import Extension, setup

COMPILED_PY = {"_worker": "helix_async/worker.py", "_memory": "helix_async/transport/memory.py"}


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
    # Python modules compiled as they are: the .py stays the specification and the pure build.
    for mod, src in COMPILED_PY.items():
        exts.append(
            Extension(f"helix_async._ext.{mod}", [src], extra_compile_args=["-O3", "-ffp-contract=off"])
        )
    return cythonize(
        exts,
        language_level=3,
    )


setup(ext_modules=_extensions())
