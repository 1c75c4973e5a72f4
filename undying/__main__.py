"""`python -m undying ...`: the same as the `undying` command."""

from undying.cli import main

raise SystemExit(main())
