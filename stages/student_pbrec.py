"""DVC stage `student-pbrec`: see grounding.stages.STAGES["student-pbrec"]."""

from stages import main

if __name__ == "__main__":
    main("student-pbrec")
