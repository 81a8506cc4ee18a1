"""``python -m zmgpu.node``: the same as the ``zmgpu-node`` command."""

from .app import main

raise SystemExit(main())
