"""DVC stage `student-rec-pseudo`: see grounding.stages.STAGES["student-rec-pseudo"]."""

from stages import main

if __name__ == "__main__":
    main("student-rec-pseudo")
