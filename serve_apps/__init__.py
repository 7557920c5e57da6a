"""Ray Serve applications of d3ray: the OpenAI-compatible dLLM server (``serve_apps.openai_app``)."""
