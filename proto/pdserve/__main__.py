"""`python -m pdserve ...` is the `pdserve` command."""

from pdserve.cli import main

raise SystemExit(main())
