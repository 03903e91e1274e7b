"""Which build runs: the modules compiled with mypyc, and whether they run compiled.

The list of compiled modules is here and nowhere else: setup.py reads this file
by path (the package cannot be imported while it is built) and compiles them;
at run time `describe()` tells `--version`, /status and the start's log line
what actually runs. No import beyond the standard library, and none of the
package's, so setup.py can run it.

Rules:
1. The build is all or nothing. mypyc puts every compiled module in one shared
   library (GROUP); a compiled module calls the compiled classes and functions
   of the modules it imports directly, and importing it initialises those
   modules inside the library and puts them in `sys.modules`, over an
   interpreted copy imported before (tests/test_build_info.py shows it). So
   no mix can be chosen: every module below runs compiled, or none does.
2. `TCPPROXY_INTERPRETED=1` (any value but empty or 0) runs none compiled: a
   finder ahead of the import system loads their `.py` sources
   (`tcpproxy/__init__.py` installs it before anything else is imported).
3. The build writes STAMP beside the compiled modules: mypyc's version and a
   digest of each source it compiled. A source that no longer matches (an
   editable install, edited since) or that the stamp lacks (the list grew)
   makes the build stale: the compiled code runs, not the source, and
   `stale()` names it (`make setup` then compiles again; the start warns).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Final

__all__ = [
    "COMPILED_MODULES",
    "GROUP",
    "INTERPRETED_ENV",
    "STAMP",
    "announce",
    "changed_sources",
    "describe",
    "interpret",
    "interpreted_requested",
    "source_digest",
    "source_path",
    "stale",
]

# The hot path: what runs per connection and per event (the "compiled hot path").
COMPILED_MODULES: Final = (
    "tcpproxy.admission",
    "tcpproxy.balance",
    "tcpproxy.engine",
    "tcpproxy.engine.accept",
    "tcpproxy.engine.check",
    "tcpproxy.engine.conn",
    "tcpproxy.engine.core",
    "tcpproxy.engine.dial",
    "tcpproxy.engine.loop",
    "tcpproxy.engine.preamble",
    "tcpproxy.engine.relay",
    "tcpproxy.engine.timers",
    "tcpproxy.flow",
    "tcpproxy.health",
    "tcpproxy.hostnames",
    "tcpproxy.proxy_protocol",
    "tcpproxy.sniff",
)
GROUP: Final = "tcpproxy.compiled"  # mypyc's shared library: tcpproxy/compiled__mypyc.*.so
STAMP: Final = "compiled.json"  # in the package directory, written by the build (rule 3)
INTERPRETED_ENV: Final = "TCPPROXY_INTERPRETED"

_PACKAGE = os.path.dirname(os.path.abspath(__file__))  # tcpproxy/, where STAMP is
_ROOT = os.path.dirname(_PACKAGE)  # the directory that holds tcpproxy/
_EXTENSIONS = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def source_path(module: str, root: str = _ROOT) -> str:
    """The `.py` file of `module` under `root` (a package's `__init__.py`)."""
    base = os.path.join(root, *module.split("."))
    return base + ".py" if not os.path.isdir(base) else os.path.join(base, "__init__.py")


def source_digest(path: str) -> str:
    """What the stamp records of a source: SHA-256 of its bytes."""
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def interpreted_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Rule 2: whether the environment asks for the interpreted build."""
    return environ.get(INTERPRETED_ENV, "") not in ("", "0")


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Rule 2: the compiled modules from their `.py` sources, never their `.so`."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED_MODULES:
            return None
        source = source_path(fullname)
        locations = [os.path.dirname(source)] if source.endswith("__init__.py") else None
        return importlib.util.spec_from_file_location(
            fullname, source, submodule_search_locations=locations
        )


def interpret() -> None:
    """Install the finder of rule 2 (idempotent); before the modules are imported."""
    if not any(isinstance(finder, _SourceFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SourceFinder())


def _origins() -> dict[str, str]:
    """Each compiled module's file as imported, or as it would be (not importing it)."""
    origins = {}
    for name in COMPILED_MODULES:
        module = sys.modules.get(name)
        spec = importlib.util.find_spec(name) if module is None else None
        # finding a package's module imports the package, whose compiled code may have
        # imported the module meanwhile (then its spec is not the import system's to give)
        module = sys.modules.get(name)
        if module is not None:
            origin = getattr(module, "__file__", None) or ""
        else:
            origin = (spec.origin or "") if spec is not None else ""
        origins[name] = origin
    return origins


def _compiled(origins: dict[str, str]) -> list[str]:
    return [name for name, origin in origins.items() if origin.endswith(_EXTENSIONS)]


def _stamp() -> dict[str, object]:
    """The build's stamp ({} if there is none)."""
    try:
        with open(os.path.join(_PACKAGE, STAMP), encoding="utf-8") as file:
            stamp = json.load(file)
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def describe() -> str:
    """The build that runs: "compiled (mypyc X.Y)" or "interpreted" (with why, if asked for)."""
    origins = _origins()
    compiled = _compiled(origins)
    if len(compiled) == len(origins):
        return f"compiled (mypyc {_stamp().get('mypyc', 'of unknown version')})"
    if compiled:  # rule 1 says this cannot happen: say so rather than hide it
        return f"partly compiled ({', '.join(compiled)})"
    if interpreted_requested():
        return f"interpreted ({INTERPRETED_ENV}=1)"
    return "interpreted"


def stale() -> list[str]:
    """Rule 3: the sources (paths) that changed since the compiled code that runs was built."""
    return changed_sources() if _compiled(_origins()) else []


def changed_sources() -> list[str]:
    """The sources (paths) of the modules to compile that differ from the last build's
    stamp, or that it lacks (the list grew); [] where nothing was ever compiled."""
    stamp = _stamp()
    if not stamp:
        return []
    digests = stamp.get("sources", {})
    if not isinstance(digests, dict):
        digests = {}
    found = []
    for name in COMPILED_MODULES:
        path = source_path(name)
        try:
            current = source_digest(path)
        except OSError:
            continue  # an install without sources: nothing to be stale against
        if digests.get(name) != current:
            found.append(os.path.relpath(path, _ROOT))
    return found


def announce(log: logging.Logger) -> None:
    """The start's one line about the build, where there is something to say."""
    build = describe()
    if build.startswith("interpreted ("):
        log.info("%s build: the hot path runs as plain Python, as asked", build)
    elif not build.startswith("compiled"):
        log.warning(
            "%s build: the hot path does not run compiled (no C compiler or Python "
            "headers at install?) and costs more CPU; README: 'The compiled build'",
            build,
        )
    changed = stale()
    if changed:
        log.warning(
            "the compiled build is stale: %s changed since it was compiled, and the old "
            "code runs; rebuild with 'make setup', or run with %s=1",
            ", ".join(changed),
            INTERPRETED_ENV,
        )
