"""``localmoa serve``: every ensemble as one model behind an OpenAI-compatible endpoint."""
