"""DVC stage 'recover': a thin entry point; all logic lives in loram.commands.cmd_recover."""

from loram.commands import main_stage

if __name__ == "__main__":
    main_stage("recover")
