"""Generated images: names (names), writing (png), serving from the outputs folder (serving)."""
