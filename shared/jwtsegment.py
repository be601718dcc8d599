"""A JWT's parts read without verifying them (no key and no PyJWT, so that a process that only
holds a token, the agent, does not load them): what the CSC checks a token's header with
before it verifies the signature, and what the agent reads its token's expiry from."""

from __future__ import annotations

import base64
import json


def segment_json(segment: str) -> object:
    """The JSON value that one base64url segment of a JWT encodes (padding optional). Raises
    ValueError (bad base64, not ASCII or UTF-8, not JSON) or RecursionError (JSON nested too
    deep) when it is not one."""
    padded = segment + "=" * (-len(segment) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
