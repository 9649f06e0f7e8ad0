"""`python -m launcher` is the same as the `loom` command."""

from launcher.cli import main

raise SystemExit(main())
