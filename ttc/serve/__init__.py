"""`ttc serve`: an OpenAI-compatible server on the built-in engine, with test-time compute per request."""
