"""DVC stage `clip-image`: see grounding.stages.STAGES["clip-image"]."""

from stages import main

if __name__ == "__main__":
    main("clip-image")
