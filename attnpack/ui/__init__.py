"""The Gradio web UI (``attnpack ui``). Built in a later milestone; nothing here loads a model at import time."""

__all__: list[str] = []
