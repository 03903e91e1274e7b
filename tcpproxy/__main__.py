from tcpproxy.cli import main

raise SystemExit(main())
