"""The OpenAI-compatible HTTP server (`shardserve serve`)."""
