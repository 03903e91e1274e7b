from bpfproxy.cli import main

raise SystemExit(main())
