"""Who may use the API: API keys, who owns what, and how much each key may ask for."""
