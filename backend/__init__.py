"""PIEscope: find, explain and check circuits in language models."""

__version__ = "0.1.0"
