"""``python -m service.client``: the ``pose-client`` command."""

import sys

from service.client.cli import main

sys.exit(main())
