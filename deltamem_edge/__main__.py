"""``python -m deltamem_edge`` is the same as the ``deltamem-edge`` command."""

from deltamem_edge.cli.main import main

raise SystemExit(main())
