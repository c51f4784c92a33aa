"""The dashboard at /ui: server-rendered pages (Jinja2) with a little plain JS, signed in
with an API key kept as a session cookie. It calls the same services as the JSON API."""
