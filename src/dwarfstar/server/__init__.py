"""``ds4 serve``: the engine behind the OpenAI and Anthropic HTTP APIs (FastAPI + uvicorn, SSE).

The top layer: it imports the engine and the chat mappings, and nothing imports it.
"""
