"""DVC stage 'train': parses its options and calls loram.pipeline.train.run."""

import sys

from loram.pipeline import train
from loram.pipeline.entry import stage_main

if __name__ == "__main__":
    sys.exit(stage_main(train))
