"""DVC stage `qam`: see grounding.stages.STAGES["qam"]."""

from stages import main

if __name__ == "__main__":
    main("qam")
