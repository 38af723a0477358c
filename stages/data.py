"""DVC stage 'data': parses its options and calls loram.pipeline.data.run."""

import sys

from loram.pipeline import data
from loram.pipeline.entry import stage_main

if __name__ == "__main__":
    sys.exit(stage_main(data))
