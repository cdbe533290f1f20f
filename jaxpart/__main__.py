from jaxpart.cli import main

raise SystemExit(main())
