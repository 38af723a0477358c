"""DVC stage 'recover': parses its options and calls loram.pipeline.recover.run."""

import sys

from loram.pipeline import recover
from loram.pipeline.entry import stage_main

if __name__ == "__main__":
    sys.exit(stage_main(recover))
