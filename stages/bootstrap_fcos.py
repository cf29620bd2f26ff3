"""DVC stage `bootstrap-fcos`: see grounding.stages.STAGES["bootstrap-fcos"]."""

from stages import main

if __name__ == "__main__":
    main("bootstrap-fcos")
