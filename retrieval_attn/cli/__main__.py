"""``python -m retrieval_attn.cli``: the ``retrieval-attn`` command."""

import sys

from . import main

sys.exit(main())
