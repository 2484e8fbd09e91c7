"""tokenmill: batch LLM jobs on local models, with nothing lost and every token counted."""

__version__ = "0.1.0"
