import os
import signal
import sys

if sys.argv[1:2] in (["run"], ["worker"]):
    # A descriptor 0, 1 or 2 left closed (started with `2>&-`) would be the
    # first one a socket or libuv's epoll takes: libuv aborts the process when
    # it closes one of those (uv__close asserts fd > 2), and what is written to
    # stderr would go into that socket. /dev/null in their place.
    for _fd in (0, 1, 2):
        try:
            os.fstat(_fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # takes the lowest free descriptor: this one
    # SIGUSR1 and SIGQUIT would end the process (their default action), and
    # `systemctl kill -s USR1` signals every process of the unit: each worker,
    # every call with it (an operator used to nginx sends USR1 to reopen logs,
    # QUIT for a graceful stop). Ignored from here; the supervisor and the
    # workers say so once their loop runs (the supervisor-crash audit of
    # session 26). Inherited by the workers and kept across an upgrade's exec.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)

if sys.argv[1:2] == ["worker"]:
    # A worker (started by the supervisor) acts on neither: reloads and upgrades
    # are the supervisor's, and `systemctl kill -s HUP|USR2` signals every process
    # of the unit. Ignored from here, before the imports: their default action
    # ended a worker still starting (the worker logs a SIGHUP once its loop runs).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)

from fleet_ingress.cli import main  # after the signals, on purpose

raise SystemExit(main())
