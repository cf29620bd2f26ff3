"""DVC stage `student-bicm`: see grounding.stages.STAGES["student-bicm"]."""

from stages import main

if __name__ == "__main__":
    main("student-bicm")
