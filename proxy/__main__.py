"""`python -m proxy` is the same as the `ollamux` command."""

from __future__ import annotations

from proxy.cli import main

raise SystemExit(main())
