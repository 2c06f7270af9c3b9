"""``python -m qwen25vl_embed_server.cli``: the same as the ``qwen25vl-embed`` command."""

import sys

from qwen25vl_embed_server.cli.app import main

sys.exit(main())
