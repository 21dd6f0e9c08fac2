"""The embedded job system: a SQLite store and worker processes supervised by the API process."""
