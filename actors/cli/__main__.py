"""`python -m actors.cli` is the `model-trainer` command."""

import sys

from actors.cli.main import main

sys.exit(main())
