"""`python -m vcon_fx` is the `vcon-fx` command."""

import sys

from .cli.main import main

sys.exit(main())
