"""API key format, generation and hashing. Pure functions, no I/O.

Format (66 characters)::

    mk_live_3fK9xQ2a_<43 base62 chars of secret><6 base62 chars of CRC32>
    └┬┘└┬─┘└──┬───┘
     │  │     └ public key id (8 base62): with the environment, the "prefix"
     │  │       shown to humans and stored in api_keys.prefix
     │  └ environment: live | test
     └ product marker

The secret is 32 bytes from :mod:`secrets` (256 bits). The trailing CRC32
(over everything before it) lets a mistyped or made-up key be rejected
before any Redis or PostgreSQL lookup, as GitHub's token format does.

Secret scanners can match keys with :data:`KEY_PATTERN`::

    mk_(?:live|test)_[0-9A-Za-z]{8}_[0-9A-Za-z]{49}

Only a hash is stored: HMAC-SHA256 with a server-side pepper
(``METERING_KEY_PEPPER``) when one is configured, plain SHA-256 otherwise.
Changing the pepper invalidates every key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib
from dataclasses import dataclass

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ENVIRONMENTS = ("live", "test")
KID_LEN = 8
SECRET_LEN = 43  # 62**43 > 2**256
CHECKSUM_LEN = 6  # 62**6 > 2**32
KEY_PATTERN = re.compile(r"mk_(?:live|test)_[0-9A-Za-z]{8}_[0-9A-Za-z]{49}")
_EXACT = re.compile(r"mk_(live|test)_([0-9A-Za-z]{8})_([0-9A-Za-z]{43})([0-9A-Za-z]{6})")


class MalformedKey(ValueError):
    """Not something this system could have issued (shape or checksum)."""


@dataclass(frozen=True, slots=True)
class NewKey:
    plaintext: str  # shown once, never stored or logged
    prefix: str  # mk_live_3fK9xQ2a
    environment: str


@dataclass(frozen=True, slots=True)
class ParsedKey:
    environment: str
    prefix: str


def _b62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(ALPHABET[r])
    if n:
        raise ValueError("number does not fit the width")
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _b62(zlib.crc32(body.encode()), CHECKSUM_LEN)


def generate(environment: str = "live") -> NewKey:
    if environment not in ENVIRONMENTS:
        raise ValueError(f"environment must be one of {', '.join(ENVIRONMENTS)}")
    kid = "".join(secrets.choice(ALPHABET) for _ in range(KID_LEN))
    secret = _b62(int.from_bytes(secrets.token_bytes(32)), SECRET_LEN)
    prefix = f"mk_{environment}_{kid}"
    body = f"{prefix}_{secret}"
    return NewKey(body + _checksum(body), prefix, environment)


def parse(key: str) -> ParsedKey:
    """Check shape and checksum; raise :class:`MalformedKey` without revealing why."""
    match = _EXACT.fullmatch(key)
    if match is None:
        raise MalformedKey("malformed API key")
    env, kid, secret, check = match.groups()
    body = f"mk_{env}_{kid}_{secret}"
    if not hmac.compare_digest(_checksum(body), check):
        raise MalformedKey("malformed API key")
    return ParsedKey(env, f"mk_{env}_{kid}")


def hash_key(key: str, pepper: bytes | None = None) -> str:
    """The stored form of a key: hex HMAC-SHA256(pepper, key), or SHA-256 without pepper."""
    if pepper:
        return hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256(key.encode()).hexdigest()


def redact(text: str) -> str:
    """Replace anything that looks like a key with its prefix and a marker (for logs)."""
    return KEY_PATTERN.sub(lambda m: m.group(0)[:16] + "_[REDACTED]", text)
