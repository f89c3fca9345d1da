"""``python -m smooth_infonce.integrations.solo``: the ``smooth-infonce-solo`` launcher."""

import sys

from .launcher import main

sys.exit(main())
