"""``python -m align_ray.web``: same as ``align-ray demo-web``."""

import sys

from align_ray.web.server import main

sys.exit(main(sys.argv[1:]))
