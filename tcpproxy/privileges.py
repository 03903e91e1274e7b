"""Dropping root after setup: switch to an unprivileged user and keep no capability.

Both binaries need privileges only to set up: bpfproxy to load its program,
attach it, pin it and mount bpffs; tcpproxy to bind ports below 1024. After
that they serve as ``--user`` (default ``nobody``) with no capability:

- :func:`target_account` decides, at start, whom to become: started as root,
  the ``--user`` account; started as another user, nobody else (``--user``
  naming someone else is then an error: only root can switch).
- :func:`check_access` checks, still at start and before any setup, that
  the account can read the config file and the code it still imports
  (briefly taking its identity as the effective one). If it cannot, what
  happens is :func:`when_unreadable`'s decision: an account named with
  ``--user`` is an error at start (rather than failed reloads later); the
  default account keeps CAP_DAC_READ_SEARCH or, where that cannot be kept
  (Docker's default capabilities), root stays root with no capability;
  either with a warning, so that a config or a clone in a private
  directory (a mode-700 temp dir, /root) still works without options.
- :func:`drop_privileges` switches uid, gid and groups and clears every
  capability (permitted, effective, inheritable, ambient) except the ones
  asked to keep, sets ``no_new_privs`` and checks the result in
  /proc/self/status.

Rules: call these before any thread starts (capabilities and no_new_privs are
per thread; the uid switch is process-wide); a capability kept is named in
the log line that reports the drop.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import pwd
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tcpproxy.errors import StartupError
from tcpproxy.sources.file import OPEN_FLAGS

__all__ = [
    "CAP_BPF",
    "CAP_DAC_READ_SEARCH",
    "CAP_NET_BIND_SERVICE",
    "DEFAULT_USER",
    "Account",
    "Serving",
    "Unreadable",
    "capability_sets",
    "check_access",
    "drop_privileges",
    "inherited_capabilities",
    "target_account",
    "under_service_manager",
    "unprivileged_port_start",
    "when_unreadable",
]

log = logging.getLogger("tcpproxy")

DEFAULT_USER = "nobody"  # every Debian system has it; the units may create their own

# Capability numbers (include/uapi/linux/capability.h).
CAP_DAC_READ_SEARCH = 2  # read any file, search any directory (not write, not execute)
CAP_NET_BIND_SERVICE = 10
CAP_BPF = 39
_CAP_NAMES = {
    CAP_DAC_READ_SEARCH: "CAP_DAC_READ_SEARCH",
    CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE",
    CAP_BPF: "CAP_BPF",
}

# prctl(2) options (include/uapi/linux/prctl.h).
_PR_SET_KEEPCAPS = 8
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522  # two 32-bit words per set

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong)  # fmt: skip


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


@dataclass(frozen=True)
class Account:
    """Whom the process becomes: a user, its primary group, and no supplementary groups."""

    name: str
    uid: int
    gid: int


def target_account(user: str | None, *, upgrade: bool = False) -> Account | None:
    """The account to switch to after setup, or None to keep the current user.

    Started as root (euid 0): ``user``, or :data:`DEFAULT_USER` when None.
    Started as another user: None (only capabilities are dropped) when
    ``user`` is None or names that user; StartupError otherwise, since only
    root can switch users. ``user`` may be a name or a numeric uid.
    ``upgrade`` (started by a predecessor's SIGUSR2, already unprivileged): with
    no ``user``, None whoever we are: the predecessor chose, perhaps to stay root.
    """
    euid = os.geteuid()
    if user is None and (euid != 0 or upgrade):
        return None
    account = _lookup(user or DEFAULT_USER)
    if euid != 0:
        if account.uid != euid:
            raise StartupError(
                f"--user {user}: only root can switch to another user (started as uid {euid})"
            )
        return None
    return account


def _lookup(user: str) -> Account:
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise StartupError(f"--user {user}: no such user") from None
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _as(account: Account, attempt: Callable[[], None]) -> None:
    """Run ``attempt`` with ``account`` as the effective user and group (no groups), then
    become root again. StartupError if the switch is refused (no CAP_SETUID/SETGID)."""
    groups, egid = os.getgroups(), os.getegid()
    try:
        try:
            os.setgroups([])
            os.setegid(account.gid)
            os.seteuid(account.uid)
        except OSError as exc:
            raise StartupError(
                f"cannot switch to user {account.name} (--user) ({exc.strerror}): root "
                "needs CAP_SETUID and CAP_SETGID to drop to another user; grant them, or "
                "give --user root"
            ) from None
        attempt()
    finally:
        if os.geteuid() != 0:
            os.seteuid(0)
        if os.getegid() != egid:
            os.setegid(egid)
        if os.getgroups() != groups:
            os.setgroups(groups)


def _without_capabilities(attempt: Callable[[], None]) -> None:
    """Run ``attempt`` as ourselves with no effective capability (what uid 0 reads
    after the drop: only what the permission bits give it), then take them back."""
    sets = capability_sets()
    _capset(0, sets["CapPrm"], sets["CapInh"])
    try:
        attempt()
    finally:
        _capset(sets["CapEff"], sets["CapPrm"], sets["CapInh"])


class Unreadable(enum.Enum):
    """What to do when the account to serve as cannot read the config or the code."""

    REFUSE = "refuse"  # StartupError naming the path: exit 2
    KEEP_READ_SEARCH = "keep CAP_DAC_READ_SEARCH"  # serve as that account all the same
    STAY = "stay"  # serve as the user we started as (root), with no capability


def when_unreadable(
    *, chosen: bool, read_search_permitted: bool, managed: bool = False
) -> Unreadable:
    """The decision, by rules:

    1. An account that was chosen (``--user`` or its environment variable) is the
       operator's word: no capability and no other user makes up for it.
    2. The default account keeps CAP_DAC_READ_SEARCH (read any file, nothing more)
       where this process may keep it: a host's root, most units.
    3. Else (Docker's default capabilities leave it out, as may a bounding set) root
       stays root with no capability, as ``--user root`` does: the newcomer's clone
       under /root, in a container, works with no option. It is checked in turn.
    4. Except under a service manager (``managed``: $INVOCATION_ID or $NOTIFY_SOCKET
       set): a unit whose bounding set leaves CAP_DAC_READ_SEARCH out chose to serve
       as that account; uid 0, even with no capability, still owns every root file
       and /proc/sys, so it is refused there rather than done unasked.
    """
    if chosen:
        return Unreadable.REFUSE
    if read_search_permitted:
        return Unreadable.KEEP_READ_SEARCH
    return Unreadable.REFUSE if managed else Unreadable.STAY


def under_service_manager(environ: Mapping[str, str] | None = None) -> bool:
    """Started by a service manager: systemd sets $INVOCATION_ID for every unit and
    $NOTIFY_SOCKET for Type=notify ones."""
    env = os.environ if environ is None else environ
    return bool(env.get("INVOCATION_ID") or env.get("NOTIFY_SOCKET"))


@dataclass(frozen=True)
class Serving:
    """Whom to serve as after the drop, and the capabilities kept so that it reads."""

    account: Account | None
    keep: tuple[int, ...] = ()


def check_access(
    account: Account | None, config_path: Path, code: Iterable[Path], *, chosen: bool
) -> Serving:
    """Check that ``account`` can read the config file and list the directories in
    ``code`` (the packages imported while serving); return whom to serve as and the
    capabilities it must keep to read them.

    ``account`` as it is, keeping nothing, when it can, and for None or the user we
    already are. When it cannot, :func:`when_unreadable` decides, with ``chosen``
    (the account was named, with --user or its environment variable): StartupError;
    ``account`` keeping (CAP_DAC_READ_SEARCH,); or the user we are (root) keeping
    nothing, if it can read them without capabilities (else StartupError). The two
    last warn once, naming the path and how to serve as ``account`` instead.
    """
    if account is None or account.uid == os.geteuid():
        return Serving(account)  # staying who we are: the files were readable a moment ago
    refused = _refused(account, config_path, code)
    if refused is None:
        return Serving(account)
    what, path, why = refused
    permitted = bool(capability_sets()["CapPrm"] & (1 << CAP_DAC_READ_SEARCH))
    managed = under_service_manager()
    decision = when_unreadable(chosen=chosen, read_search_permitted=permitted, managed=managed)
    name = account.name
    shown = f"{'the config file ' if what == 'config' else ''}{path}"
    if decision is Unreadable.KEEP_READ_SEARCH:
        log.warning(
            "user %s cannot read %s (%s): serving as %s anyway, keeping CAP_DAC_READ_SEARCH "
            "(it reads any file) to reload the config and import the code; to serve with no "
            "capability, make it and its directories readable by %s, or pass --user",
            name, shown, why, name, name,
        )  # fmt: skip
        return Serving(account, (CAP_DAC_READ_SEARCH,))
    if decision is Unreadable.STAY:
        why += "; CAP_DAC_READ_SEARCH, which would read it anyway, is not permitted here"
        ours = _current_account()
        if _refused(ours, config_path, code) is None:
            log.warning(
                "user %s cannot read %s (%s): serving as %s (uid %d) with no capabilities "
                "instead, as --user %s does; to serve as %s, make it and its directories "
                "readable by %s (or install it elsewhere), or pass --user",
                name, shown, why, ours.name, ours.uid, ours.name, name, name,
            )  # fmt: skip
            return Serving(ours)
        why += f", and {ours.name} cannot without capabilities"
    elif not chosen and not permitted and managed:
        why += (
            "; CAP_DAC_READ_SEARCH, which would read it anyway, is not permitted here, and "
            "under a service manager root does not stay root unasked"
        )
    who = f"user {name} (--user)"
    if what == "config":
        raise StartupError(
            f"{who} cannot read the config file {path} ({why}), and "
            "bpfproxy/tcpproxy serve as that user after setup: make the file and its "
            "directories readable by it, or choose another --user"
        )
    raise StartupError(
        f"{who} cannot read {path} ({why}), where this program's "
        "code is: install it where that user can read it, or choose another --user"
    )


def _refused(
    account: Account, config_path: Path, code: Iterable[Path]
) -> tuple[str, Path, str] | None:
    """(what, path, why) of the first path ``account`` cannot read, or None: tried with
    its identity as the effective one and no capability (ours, with no capability)."""
    found: list[tuple[str, Path, str]] = []

    def attempt() -> None:
        try:  # non-blocking: a FIFO's open() waits for a writer (the reader refuses it)
            os.close(os.open(config_path, OPEN_FLAGS))
        except FileNotFoundError:
            pass  # said by the config reader, in its own words
        except OSError as exc:
            found.append(("config", config_path, exc.strerror or str(exc)))
            return
        for directory in code:
            try:
                os.listdir(directory)
            except OSError as exc:
                found.append(("code", directory, exc.strerror or str(exc)))
                return

    if account.uid == os.geteuid():
        _without_capabilities(attempt)
    else:
        _as(account, attempt)
    return found[0] if found else None


def _current_account() -> Account:
    """The user and group we run as (to stay them)."""
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return Account(name, uid, os.getegid())


def unprivileged_port_start() -> int:
    """The lowest port anyone may bind (net.ipv4.ip_unprivileged_port_start)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def capability_sets(pid: int | str = "self") -> dict[str, int]:
    """CapInh, CapPrm, CapEff, CapBnd and CapAmb of a process, from /proc/PID/status."""
    sets = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cap"):
            key, _, value = line.partition(":")
            sets[key] = int(value, 16)
    return sets


def _prctl(option: int, arg: int = 0, what: str = "prctl") -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for word in range(2):
        data[word].effective = (effective >> (32 * word)) & 0xFFFFFFFF
        data[word].permitted = (permitted >> (32 * word)) & 0xFFFFFFFF
        data[word].inheritable = (inheritable >> (32 * word)) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def inherited_capabilities() -> tuple[int, ...]:
    """What a process started by an upgrade keeps: what its predecessor kept (ambient,
    so inherited), no more: it starts unprivileged and binds only as that user."""
    permitted = capability_sets()["CapPrm"]
    return tuple(cap for cap in range(64) if permitted & (1 << cap))


def drop_privileges(
    account: Account | None, keep: Collection[int] = (), *, ambient: Collection[int] = ()
) -> None:
    """Become ``account`` (None: stay who we are) with no capability but ``keep``.

    ``ambient``: those of ``keep`` also raised as ambient capabilities, so that
    processes this one starts (workers) have them too. Raises StartupError
    if the kernel refuses a step, or if /proc/self/status shows anything else
    than asked for afterwards.
    """
    mask = sum(1 << cap for cap in keep)
    inherited = sum(1 << cap for cap in ambient)
    if inherited & ~mask:
        raise ValueError(f"ambient capabilities {inherited:#x} are not all kept ({mask:#x})")
    if account is None:
        held = capability_sets()
        if not (held["CapEff"] or held["CapPrm"] or held["CapAmb"]):
            return  # not root and no capability: nothing to drop, nothing changes
    try:
        if keep:
            _prctl(_PR_SET_KEEPCAPS, 1, "PR_SET_KEEPCAPS")
        if account is not None and account.uid != os.geteuid():
            os.setgroups([])
            os.setresgid(account.gid, account.gid, account.gid)
            os.setresuid(account.uid, account.uid, account.uid)
        _capset(mask, mask, inherited)
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, "PR_CAP_AMBIENT_CLEAR_ALL")
        for cap in ambient:
            if _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap, 0, 0) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"PR_CAP_AMBIENT_RAISE: {os.strerror(err)}")
        if keep:
            _prctl(_PR_SET_KEEPCAPS, 0, "PR_SET_KEEPCAPS")
        _prctl(_PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
    except OSError as exc:
        raise StartupError(f"cannot drop privileges: {exc}") from None
    sets = capability_sets()
    if (
        sets["CapEff"] != mask
        or sets["CapPrm"] != mask
        or (account is not None and os.getuid() != account.uid)
    ):
        raise StartupError(f"dropping privileges left {sets}, wanted only {mask:#x}")
    kept = ", ".join(_CAP_NAMES.get(cap, str(cap)) for cap in sorted(keep))
    log.info(
        "serving as uid %d gid %d%s with %s", os.getuid(), os.getgid(),
        f" ({account.name})" if account else "", f"only {kept}" if kept else "no capabilities",
    )  # fmt: skip
