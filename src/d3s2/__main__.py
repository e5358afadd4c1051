from d3s2.cli import main

raise SystemExit(main())
