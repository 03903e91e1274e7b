"""`python -m bpfproxy`: the bpfproxy command."""

from bpfproxy.cli import main

raise SystemExit(main())
