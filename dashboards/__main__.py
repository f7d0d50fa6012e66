"""`python -m dashboards [RUNS_ROOT] [--host HOST] [--port PORT]`: the dashboard without the fedsim CLI."""

import sys

from dashboards.app import main

sys.exit(main())
