"""DVC stage `frcnn-proposals`: see grounding.stages.STAGES["frcnn-proposals"]."""

from stages import main

if __name__ == "__main__":
    main("frcnn-proposals")
