"""Ray job entrypoint for the data-stage demo.

    ray job submit --working-dir . -- python workflows/data_demo.py --rows 2000
    python workflows/data_demo.py            # local: starts a throwaway Ray cluster

The whole chain (data -> filter -> train -> eval -> index -> serve) is workflows/end_to_end.py.
"""

import sys

from align_ray.demo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
