"""DVC stage `gt-boxes`: see grounding.stages.STAGES["gt-boxes"]."""

from stages import main

if __name__ == "__main__":
    main("gt-boxes")
