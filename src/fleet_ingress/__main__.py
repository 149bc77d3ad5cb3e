import signal
import sys

if sys.argv[1:2] == ["worker"]:
    # A worker (started by the supervisor) acts on neither: reloads and upgrades
    # are the supervisor's, and `systemctl kill -s HUP|USR2` signals every process
    # of the unit. Ignored from here, before the imports: their default action
    # ended a worker still starting (the worker logs a SIGHUP once its loop runs).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)

from fleet_ingress.cli import main  # after the signals, on purpose

raise SystemExit(main())
