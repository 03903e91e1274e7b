"""Compiles and loads the program in a short-lived child process; only descriptors come back.

bcc links LLVM and clang: importing it maps some 130 MB into a process, for
a compile that takes a second. So the serving process never imports it:
:func:`load_in_child` starts a child (a fresh interpreter running
:func:`_child_main`), which compiles and loads ``sk_lookup.c`` with
:func:`bpfproxy.loader.compile_and_load` and sends the program's and maps'
file descriptors back over a Unix socket pair (SCM_RIGHTS), then exits. The
kernel objects live on: the descriptors received hold them.

A descriptor, not a pin, crosses the process boundary, so this works where no
bpffs is mounted (unpinned state) as well as where there is one.

Error handling: a :class:`SteeringError` in the child (compile error,
verifier log, missing bcc or privileges) comes back as its message and is
raised again here; a child that dies without answering is a SteeringError
naming its exit status.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

from .errors import SteeringError
from .loader import MAPS, Program, check_program

__all__ = ["load_in_child"]

_MAX_MESSAGE = 1 << 20  # a compile error with its diagnostics fits easily
_MAX_FDS = 2 + len(MAPS)  # the two programs and every map
# The child imports this module from the same directory as the parent, whatever its cwd.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_CHILD = "import sys; sys.path.insert(0, sys.argv[1]); from bpfproxy.compiler import _child_main; _child_main(int(sys.argv[2]))"  # noqa: E501


def load_in_child() -> Program:
    """Compile and load the program in a child process and return its descriptors.

    Raises SteeringError saying what to do (as :func:`compile_and_load` does).

    Resource handling: the caller owns the returned Program; the child has
    exited when this returns.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        try:
            child = subprocess.Popen(
                [sys.executable, "-c", _CHILD, _PACKAGE_ROOT, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            raise SteeringError(f"cannot start the compile process ({exc}).") from exc
        finally:
            theirs.close()
        try:
            message, fds, _, _ = socket.recv_fds(ours, _MAX_MESSAGE, _MAX_FDS)
        except OSError as exc:
            child.kill()
            child.wait()
            raise SteeringError(f"compile process: {exc}.") from exc
        status = child.wait()
    program = _program_of(message, fds, status)
    try:
        check_program(program)  # what came back is what the dispatcher writes by
    except BaseException:
        program.close()
        raise
    return program


def _program_of(message: bytes, fds: list[int], status: int) -> Program:
    """The Program the child's answer describes, or the error it reports."""
    try:
        answer = json.loads(message) if message else {}
        if "error" in answer:
            raise SteeringError(answer["error"])
        names = [name.encode() for name in answer.get("maps", ())]
        if not names or len(fds) != 2 + len(names):
            raise SteeringError(
                f"the compile process exited with status {status} without loading the program."
            )
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Program(fds[0], fds[1], dict(zip(names, fds[2:], strict=True)))


def _child_main(fd: int) -> None:
    """In the child: compile and load, send the descriptors (or the error), exit."""
    from .loader import compile_and_load

    sock = socket.socket(fileno=fd)
    try:
        program = compile_and_load()
    except SteeringError as exc:
        answer, fds = {"error": str(exc)}, []
    except Exception as exc:  # a bug, or bcc failing in a way we do not know: say what
        last = traceback.format_exception_only(exc)[-1].strip()
        answer, fds = {"error": f"the compile process failed: {last}"}, []
    else:
        names = list(program.maps)
        answer = {"maps": [name.decode() for name in names]}
        fds = [program.prog_fd, program.hold_fd, *(program.maps[name] for name in names)]
    socket.send_fds(sock, [json.dumps(answer).encode()], fds)
    sock.close()
