"""How the nodes of a cluster know each other on a peer link: the HELLO token (docs/security.md,
"Cluster peer links").

The dialling node B puts in its HELLO a short-lived HS256 JWT under the cluster secret:
``iss`` = B's node id, ``aud`` = ``csc-peer:<A's node id>``, ``iat``, ``exp`` (:data:`TOKEN_TTL`
seconds). A accepts only that algorithm, its own audience and an unexpired token. The transport
(csc/cluster/peertls.py) authenticates the nodes too; the token stays as a second check.
"""

from __future__ import annotations

import time

import jwt

from shared.errors import AuthFailed

AUDIENCE_PREFIX = "csc-peer:"
TOKEN_TTL = 60


def peer_token(key: bytes, source: str, target: str, now: float | None = None) -> str:
    """The HELLO credential of ``source`` dialling ``target``, valid for a minute."""
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": source,
        "aud": AUDIENCE_PREFIX + target,
        "iat": issued,
        "exp": issued + TOKEN_TTL,
    }
    return jwt.encode(claims, key, algorithm="HS256")


def verify_peer_token(key: bytes, token: object, me: str) -> str:
    """The dialling node's id, or AuthFailed (wrong secret, wrong target, expired)."""
    if not isinstance(token, str):
        raise AuthFailed("the peer HELLO lacks its token", reason="missing_token")
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=["HS256"],
            audience=AUDIENCE_PREFIX + me,
            options={"require": ["iss", "aud", "exp"]},
            leeway=5,
        )
    except jwt.PyJWTError as exc:
        raise AuthFailed(f"peer token refused: {exc}", reason="peer_token") from None
    source = claims.get("iss")
    if not isinstance(source, str) or not source:
        raise AuthFailed("peer token without a node id", reason="peer_token")
    return source
