"""Converters from other checkpoint formats to the Hugging Face one."""
