"""DVC stage `refclip-export`: see grounding.stages.STAGES["refclip-export"]."""

from stages import main

if __name__ == "__main__":
    main("refclip-export")
