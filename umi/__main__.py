"""``python -m umi``: the same as the ``umi`` command."""

from umi.cli import main

raise SystemExit(main())
