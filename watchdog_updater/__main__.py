"""`python -m watchdog_updater`."""

from watchdog_updater._cli import main

raise SystemExit(main())
