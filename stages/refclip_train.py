"""DVC stage `refclip-train`: see grounding.stages.STAGES["refclip-train"]."""

from stages import main

if __name__ == "__main__":
    main("refclip-train")
