"""The web page (``GET /``): plain HTML, CSS and JavaScript files in ``static/``, a client of the public API."""
