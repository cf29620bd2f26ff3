"""DVC stage `student-nce-distill`: see grounding.stages.STAGES["student-nce-distill"]."""

from stages import main

if __name__ == "__main__":
    main("student-nce-distill")
