"""DVC stage 'params': validate the whole params.yaml (an unknown section fails here)."""

from loram.commands import main_stage

if __name__ == "__main__":
    main_stage("check")
