"""DVC stage 'evaluate': a thin entry point; all logic lives in loram.commands.cmd_evaluate."""

from loram.commands import main_stage

if __name__ == "__main__":
    main_stage("evaluate")
