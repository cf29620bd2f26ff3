"""DVC stage `yolo-anchors`: see grounding.stages.STAGES["yolo-anchors"]."""

from stages import main

if __name__ == "__main__":
    main("yolo-anchors")
