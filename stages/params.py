"""DVC stage 'params': validates the whole params.yaml (loram.pipeline.check.run)."""

import sys

from loram.pipeline import check
from loram.pipeline.entry import stage_main

if __name__ == "__main__":
    sys.exit(stage_main(check))
