"""Signed webhooks (Standard Webhooks) for job events, delivered from a durable outbox.

- ``urls.py``: which targets may be called (URL rules, SSRF: link-local and metadata addresses never,
  internal ones only when ``IMAGEN_WEBHOOK_ALLOWED_HOSTS`` lists them); ``network.py``: connections go only
  to checked addresses, and one deadline bounds each attempt.
- ``events.py``: subscriptions, deliveries and the event bodies; ``signing.py``: the Standard Webhooks headers.
- ``outbox.py``: the outbox interface; ``sqlite_outbox.py`` (a table in the embedded job database) and
  ``redis_outbox.py`` (keys in the distributed backend's Redis), one of them chosen where the app is wired.
- ``sender.py``: one HTTP attempt; ``dispatcher.py``: the background thread that turns job changes into
  deliveries and sends them through a bounded pool, with retries.
"""
