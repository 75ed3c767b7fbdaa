"""Command-line tools, the captioning pipeline, the image index, the server and the benchmark helpers."""
