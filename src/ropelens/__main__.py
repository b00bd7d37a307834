from ropelens.cli import main

raise SystemExit(main())
