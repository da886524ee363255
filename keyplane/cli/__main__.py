from keyplane.cli import main

raise SystemExit(main())
