"""`python -m llmaas` is the `llmaas` command."""

from llmaas.cli import main

raise SystemExit(main())
