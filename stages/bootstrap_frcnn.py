"""DVC stage `bootstrap-frcnn`: see grounding.stages.STAGES["bootstrap-frcnn"]."""

from stages import main

if __name__ == "__main__":
    main("bootstrap-frcnn")
