"""``python -m atomkit.cli``: the same as the ``atomkit`` command."""
import sys

from atomkit.cli import main

sys.exit(main())
