"""`blipsearch serve`: the HTTP API and the search page over the library API (`retrieval/api.py`).

Needs the `[serve]` extra (FastAPI, uvicorn). `app.py` holds the routes, `files.py` what may be served.
"""
