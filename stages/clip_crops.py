"""DVC stage `clip-crops`: see grounding.stages.STAGES["clip-crops"]."""

from stages import main

if __name__ == "__main__":
    main("clip-crops")
