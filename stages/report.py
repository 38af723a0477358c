"""DVC stage 'report': reports/results.md and plots; logic in loram.report."""

from loram.commands import main_stage

if __name__ == "__main__":
    main_stage("report")
