"""DVC stage `refclip-pseudo`: see grounding.stages.STAGES["refclip-pseudo"]."""

from stages import main

if __name__ == "__main__":
    main("refclip-pseudo")
