"""DVC stage 'merge': a thin entry point; all logic lives in loram.commands.cmd_merge."""

from loram.commands import main_stage

if __name__ == "__main__":
    main_stage("merge")
