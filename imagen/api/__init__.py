"""The HTTP layer. It never imports torch, diffusers or celery."""
