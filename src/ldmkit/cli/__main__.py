"""`python -m ldmkit.cli`, as `python -m ldmkit`."""

import sys

from ldmkit.cli import main

sys.exit(main())
