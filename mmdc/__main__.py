"""``python -m mmdc`` is ``python -m mmdc.run``."""

import sys

from mmdc.run import main

sys.exit(main())
