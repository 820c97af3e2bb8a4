"""``anchorflow serve``: an HTTP sampling service with cross-request batching.

The core (:mod:`.request`, :mod:`.batching`, :mod:`.encode`, :mod:`.service`) is free of Ray and
torch; :mod:`.deployment` puts it on Ray Serve (``pip install 'anchorflow[serve]'``).
"""
