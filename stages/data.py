"""DVC stage 'data': a thin entry point; all logic lives in loram.commands.cmd_data."""

from loram.commands import main_stage

if __name__ == "__main__":
    main_stage("data")
