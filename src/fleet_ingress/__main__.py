from fleet_ingress.cli import main

raise SystemExit(main())
