"""``python -m lcm.cli`` (as ``accelerate launch -m lcm.cli distill …`` runs it)."""

import sys

from lcm.cli import main

sys.exit(main())
