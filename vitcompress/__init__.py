"""vitcompress: compress vision transformers for a deployment target and prove it on that target."""

__version__ = "0.1.0"
