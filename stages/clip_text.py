"""DVC stage `clip-text`: see grounding.stages.STAGES["clip-text"]."""

from stages import main

if __name__ == "__main__":
    main("clip-text")
