"""``python -m smooth_infonce.integrations.demo``: the ``smooth-infonce-demo`` command."""

import sys

from .cli import main

sys.exit(main())
