"""``python -m api``: the OpenAI-compatible gateway (see api.server)."""

from api.server import main

raise SystemExit(main())
