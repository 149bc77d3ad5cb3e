import sys

from fleet_ingress.entry import main

raise SystemExit(main(sys.argv[1:]))
