"""DVC stage 'align': parses its options and calls loram.pipeline.align.run."""

import sys

from loram.pipeline import align
from loram.pipeline.entry import stage_main

if __name__ == "__main__":
    sys.exit(stage_main(align))
