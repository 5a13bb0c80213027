"""annotator: batch image-text relevance annotation with Qwen2-VL, from parquet or Hugging Face datasets."""

__version__ = "0.1.0"
