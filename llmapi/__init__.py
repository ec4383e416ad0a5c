"""llmapi: LLM inference from Hugging Face models through cached engines and a C++ executor."""
