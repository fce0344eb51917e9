"""`python -m service.cli`: the command line."""

import sys

from service.cli import main

sys.exit(main())
