"""DVC stage 'variant@NAME': one extra arm end to end; logic in loram.commands.cmd_variant."""

from loram.commands import main_stage

if __name__ == "__main__":
    main_stage("variant")
