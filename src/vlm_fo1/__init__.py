"""VLM-FO1: fine-grained perception for vision-language models by region-token retrieval."""

__version__ = "0.1.0"
