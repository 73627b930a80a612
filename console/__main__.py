"""`python -m console ...` is `mixer-label ...` (for a checkout without the console script)."""

from console.main import main

raise SystemExit(main())
