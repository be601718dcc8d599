"""``python -m tenant_agent``: the same as the ``csc-agent`` command."""

import sys

from tenant_agent.cli import main

sys.exit(main())
