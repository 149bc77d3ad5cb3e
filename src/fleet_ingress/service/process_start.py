"""What a process of `fleet-ingress run` does first, before any other import:
its standard descriptors and the signals whose default action would end it.

Called by `python -m fleet_ingress` (`__main__`, before it imports the CLI)
and by `cli.main` (the `fleet-ingress` console script, which systemd's unit
runs and which never runs `__main__`); once a process.
"""

from __future__ import annotations

import faulthandler
import os
import signal

# Ignored from the first steps (their default action ends the process, and
# `systemctl kill -s USR1` signals every process of the unit); each process
# says so once its loop runs (`lifecycle.say_signal_ignored`).
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGQUIT)

_done = False


def first_steps(command: str) -> None:
    """For `run` (the supervisor) and `worker`; nothing for another command."""
    global _done
    if _done or command not in ("run", "worker"):
        return
    _done = True
    # A descriptor 0, 1 or 2 left closed (started with `2>&-`) would be the
    # first one a socket or libuv's epoll takes: libuv aborts the process when
    # it closes one of those (uv__close asserts fd > 2), and what is written to
    # stderr would go into that socket. /dev/null in their place.
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # takes the lowest free descriptor: this one
    # SIGUSR1 and SIGQUIT would end the process (their default action), and
    # `systemctl kill -s USR1` signals every process of the unit: each worker,
    # every call with it (an operator used to nginx sends USR1 to reopen logs,
    # QUIT for a graceful stop). Ignored from here; the supervisor and the
    # workers say so once their loop runs (the supervisor-crash audit of
    # session 26). Inherited by the workers; held over an upgrade's exec
    # (upgrade_sequence.HELD_OVER_EXEC), which resets a handled signal.
    for signum in IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    # systemd's watchdog ends a supervisor whose loop is stuck with SIGABRT
    # (then started again, it takes up the workers: service.fd_store): where it
    # was stuck goes to stderr (the journal), each thread's Python stack, as
    # for a crash in native code (SIGSEGV, an abort in libuv or OpenSSL).
    # Before, the journal held nothing of it (the journey under systemd of
    # session 27).
    faulthandler.enable(2, all_threads=True)  # sys.stderr is None if fd 2 came closed
    if command == "run":
        _name_process(SUPERVISOR_NAME)
    if command == "worker":
        # A worker (started by the supervisor) acts on neither: reloads and upgrades
        # are the supervisor's, and `systemctl kill -s HUP|USR2` signals every process
        # of the unit. Ignored from here, before the imports: their default action
        # ended a worker still starting (the worker logs a SIGHUP once its loop runs).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)


# What `ps`, `pgrep -x`, `top` and `systemctl status` ("Main PID: 4242
# (fleet-ingress)") call the supervisor: the console script's name, as systemd
# started it. An upgrade re-executes it as `python3 -m fleet_ingress run`, which
# the kernel names python3: name-based monitoring lost it after the first
# upgrade (the journey under systemd of session 27).
SUPERVISOR_NAME = b"fleet-ingress"
_PR_SET_NAME = 15


def _name_process(name: bytes) -> None:
    import ctypes  # the supervisor's alone: every other command starts without it

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux's libc: the name is only cosmetic
        pass
