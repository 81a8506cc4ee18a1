"""``python -m zmgpu.cli``: the same as the ``zmgpu`` command."""

from .main import main

raise SystemExit(main())
