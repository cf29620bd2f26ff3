"""DVC stage `evaluate`: see grounding.stages.STAGES["evaluate"]."""

from stages import main

if __name__ == "__main__":
    main("evaluate")
