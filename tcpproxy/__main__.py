"""`python -m tcpproxy`: the tcpproxy command."""

from tcpproxy.cli import main

raise SystemExit(main())
