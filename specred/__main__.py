"""``python -m specred`` = the ``specred`` command."""
import sys

from .cli import main

sys.exit(main())
