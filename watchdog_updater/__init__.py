"""watchdog-updater: a self-healing, Sigstore-verified channel updater for hal0.

The command line is :mod:`watchdog_updater._cli`; :class:`watchdog_updater.app.App` wires the parts.
"""

__version__ = "0.1.0"
