"""DVC stage `fcos-points`: see grounding.stages.STAGES["fcos-points"]."""

from stages import main

if __name__ == "__main__":
    main("fcos-points")
