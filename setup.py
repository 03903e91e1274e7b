"""The build: the hot path compiled with mypyc where it can be, plain Python where not.

pyproject.toml holds the project; this file only adds the compiled modules,
listed once in tcpproxy/build_info.py (read here by path: the package cannot
be imported while it is built). Whatever stops the compile (no mypy, no C
compiler, no Python.h, a type error, a compiler error) leaves the plain,
interpreted install with a warning: the build is an optimisation the code
does not depend on. The warning is in pip's build output (`pip install -v`);
`tcpproxy --version` says which build was installed.
"""

from __future__ import annotations

import json
import os
import runpy
import shlex
import shutil
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
INFO = runpy.run_path(os.path.join(HERE, "tcpproxy", "build_info.py"))
MODULES = INFO["COMPILED_MODULES"]
PATHS = [os.path.relpath(INFO["source_path"](name, HERE), HERE) for name in MODULES]


def warn(why: str) -> None:
    print(f"tcpproxy: WARNING: not compiled, the install is interpreted: {why}", file=sys.stderr)


def missing_toolchain() -> str | None:
    """What the compile lacks that can be seen without trying it, or None."""
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    program = shlex.split(compiler)[0]
    if shutil.which(program) is None:
        return f"no C compiler ({program!r} is not on PATH; Debian: apt-get install gcc)"
    header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not os.path.exists(header):
        return f"no {header} (Debian: apt-get install python3-dev)"
    return None


class OptionalBuildExt(build_ext):
    """build_ext that falls back to no extension at all when the compile fails, and
    writes build_info.STAMP (mypyc's version, each source's digest) when it works."""

    def run(self) -> None:
        if not self.extensions:  # not compiled (extensions() said why)
            return
        try:
            super().run()
        except Exception as exc:  # CompileError, LinkError, an OSError from the compiler...
            # the compiler's own message is above; this line says what it means
            warn(f"the C compile failed ({type(exc).__name__}: {str(exc)[:120]})")
            self._undo()
            return
        self._write_stamp()

    def _undo(self) -> None:
        """All or nothing (build_info rule 1): no module of a failed build is installed,
        in place (an editable install) none left from an earlier build either. An
        earlier build's stamp stays: `make setup` compiles again once a source changes."""
        for path in self.get_outputs():
            if os.path.exists(path):
                os.remove(path)
        del self.extensions[:]

    def _stamp_directory(self) -> str:
        if self.inplace:  # `pip install -e` or `build_ext --inplace`: beside the sources
            package = self.get_finalized_command("build_py").get_package_dir("tcpproxy")
            return os.path.join(HERE, package)
        return os.path.join(self.build_lib, "tcpproxy")

    def _write_stamp(self) -> None:
        from mypy.version import __version__ as mypyc_version

        sources = {
            name: INFO["source_digest"](os.path.join(HERE, path))
            for name, path in zip(MODULES, PATHS, strict=True)
        }
        path = os.path.join(self._stamp_directory(), INFO["STAMP"])
        with open(path, "w", encoding="utf-8") as file:
            json.dump({"mypyc": mypyc_version, "sources": sources}, file, indent=1)
            file.write("\n")


def extensions() -> list:
    """mypyc's extensions for the hot path, or [] (with a warning) where it cannot be built."""
    why = missing_toolchain()
    if why is not None:
        warn(why)
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        warn(f"mypyc cannot be imported ({exc})")
        return []
    try:
        # one shared library for all (build_info rule 1), named so that it lives in the package
        return mypycify(PATHS, group_name=INFO["GROUP"])
    except (Exception, SystemExit) as exc:  # mypy's type errors end in SystemExit
        warn(f"mypyc failed ({exc!r}); run 'make typecheck'")
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
