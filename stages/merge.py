"""DVC stage 'merge': parses its options and calls loram.pipeline.merge.run."""

import sys

from loram.pipeline import merge
from loram.pipeline.entry import stage_main

if __name__ == "__main__":
    sys.exit(stage_main(merge))
