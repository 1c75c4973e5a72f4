"""`python -m undying ...`: the same as the `undying` command."""

from undying.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
