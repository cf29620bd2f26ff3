"""DVC stage `student-epmvg`: see grounding.stages.STAGES["student-epmvg"]."""

from stages import main

if __name__ == "__main__":
    main("student-epmvg")
