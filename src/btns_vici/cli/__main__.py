"""``python -m btns_vici.cli``."""

import sys

from . import main

sys.exit(main())
