"""Serving: the champion behind HTTP. Not a flow, and no Prefect in here.

- ``app``     `digitflow api`: FastAPI + uvicorn, the follower that swaps verified versions in,
              bounded request parsing, metrics, drift of the served inputs
- ``images``  arbitrary digit images (PNG, JPEG, …, IDX) turned into MNIST-style 28×28 inputs
              (also what `digitflow predict` reads)
- ``page.html`` the page to draw a digit on (plain HTML + JS, no CDN)
"""
