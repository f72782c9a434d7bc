"""The system-service face of llmaas: HTTP (LLMS contexts API and OpenAI-compatible API) over the engine."""
