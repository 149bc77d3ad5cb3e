import sys

from fleet_ingress.service.process_start import first_steps

first_steps(sys.argv[1] if len(sys.argv) > 1 else "")  # before the CLI's imports, on purpose

from fleet_ingress.cli import main  # noqa: E402

raise SystemExit(main())
