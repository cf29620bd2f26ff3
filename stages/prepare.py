"""DVC stage `prepare`: see grounding.stages.STAGES["prepare"]."""

from stages import main

if __name__ == "__main__":
    main("prepare")
