"""A Gradio chat page for the gpt2 model; it talks to Triton only through ``client``."""
