"""DVC stage 'variant': parses its options and calls loram.pipeline.variant.run."""

import sys

from loram.pipeline import variant
from loram.pipeline.entry import stage_main

if __name__ == "__main__":
    sys.exit(stage_main(variant))
