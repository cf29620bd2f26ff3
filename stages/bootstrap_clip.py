"""DVC stage `bootstrap-clip`: see grounding.stages.STAGES["bootstrap-clip"]."""

from stages import main

if __name__ == "__main__":
    main("bootstrap-clip")
