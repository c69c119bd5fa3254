"""``python -m mmdc`` is ``python -m mmdc.run``."""

import sys

from mmdc.run import main

if __name__ == "__main__":
    sys.exit(main())
