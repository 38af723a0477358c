"""DVC stage 'evaluate': parses its options and calls loram.pipeline.evaluate.run."""

import sys

from loram.pipeline import evaluate
from loram.pipeline.entry import stage_main

if __name__ == "__main__":
    sys.exit(stage_main(evaluate))
