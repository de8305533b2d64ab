"""``python -m retrieval_attn``: the ``retrieval-attn`` command."""

import sys

from .cli import main

sys.exit(main())
