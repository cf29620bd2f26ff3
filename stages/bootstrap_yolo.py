"""DVC stage `bootstrap-yolo`: see grounding.stages.STAGES["bootstrap-yolo"]."""

from stages import main

if __name__ == "__main__":
    main("bootstrap-yolo")
