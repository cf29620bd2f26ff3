"""DVC stage `clip-classes`: see grounding.stages.STAGES["clip-classes"]."""

from stages import main

if __name__ == "__main__":
    main("clip-classes")
