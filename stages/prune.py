"""DVC stage 'prune': parses its options and calls loram.pipeline.prune.run."""

import sys

from loram.pipeline import prune
from loram.pipeline.entry import stage_main

if __name__ == "__main__":
    sys.exit(stage_main(prune))
