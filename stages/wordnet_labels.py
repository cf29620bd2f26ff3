"""DVC stage `wordnet-labels`: see grounding.stages.STAGES["wordnet-labels"]."""

from stages import main

if __name__ == "__main__":
    main("wordnet-labels")
