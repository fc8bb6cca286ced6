"""`python -m vcon_fx` is the `vcon-fx` command."""

import sys

from .cli import main

sys.exit(main())
