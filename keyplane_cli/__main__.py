from keyplane_cli import main

raise SystemExit(main())
