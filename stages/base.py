"""DVC stage 'base': parses its options and calls loram.pipeline.base.run."""

import sys

from loram.pipeline import base
from loram.pipeline.entry import stage_main

if __name__ == "__main__":
    sys.exit(stage_main(base))
