"""An OpenAI-compatible HTTP API (completions, chat completions, models) for Triton's gpt2.

``protocol`` is the wire format, ``serving_*`` map each endpoint onto the model and back,
``triton`` is the engine client, ``errors`` the one way errors leave, ``server`` the app.
"""
