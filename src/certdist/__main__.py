from certdist.cli import main

raise SystemExit(main())
