"""DVC stage 'report': parses its options and calls loram.pipeline.report.run."""

import sys

from loram.pipeline import report
from loram.pipeline.entry import stage_main

if __name__ == "__main__":
    sys.exit(stage_main(report))
