"""DVC stage `clip-eval`: see grounding.stages.STAGES["clip-eval"]."""

from stages import main

if __name__ == "__main__":
    main("clip-eval")
