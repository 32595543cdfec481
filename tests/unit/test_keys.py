import re
import zlib

import pytest

from metering import keys


def test_generated_keys_have_the_documented_shape():
    new = keys.generate("live")
    assert len(new.plaintext) == 66
    assert new.plaintext.startswith(new.prefix + "_")
    assert re.fullmatch(r"mk_live_[0-9A-Za-z]{8}", new.prefix)
    assert keys.KEY_PATTERN.fullmatch(new.plaintext)
    assert keys.parse(new.plaintext) == keys.ParsedKey("live", new.prefix)
    assert keys.parse(keys.generate("test").plaintext).environment == "test"


def test_keys_are_unique_and_carry_256_bits():
    seen = {keys.generate().plaintext for _ in range(2000)}
    assert len(seen) == 2000
    assert 62**keys.SECRET_LEN > 2**256


@pytest.mark.parametrize(
    "mutate",
    [
        lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"),  # checksum char
        lambda k: k[:20] + ("x" if k[20] != "x" else "y") + k[21:],  # a secret char
        lambda k: k.replace("mk_live_", "mk_prod_"),
        lambda k: k[:-1],
        lambda k: k + "0",
        lambda k: k.replace("_", "-"),
        lambda k: "",
    ],
)
def test_typos_and_fakes_fail_the_checksum_or_shape(mutate):
    key = keys.generate().plaintext
    with pytest.raises(keys.MalformedKey) as err:
        keys.parse(mutate(key))
    assert str(err.value) == "malformed API key"  # says nothing about why


def test_checksum_is_crc32_of_the_body():
    key = keys.generate().plaintext
    body, check = key[:-6], key[-6:]
    n = 0
    for ch in check:
        n = n * 62 + keys.ALPHABET.index(ch)
    assert n == zlib.crc32(body.encode())


# Computed outside the code under test (coreutils sha256sum, openssl dgst -hmac):
# stored key hashes must never change, or every issued key stops working.
FIXED_KEY = "mk_live_3fK9xQ2a_Abc123Abc123Abc123Abc123Abc123Abc123Abc123X0cLpnf"
FIXED_SHA256 = "8932180d306181c8b934b86cb4ba2888da6c8d41d8a7a1b5870b6262830b8961"
FIXED_HMAC_PEPPER = "cb9878a40b21058acf5795bcb4b2838ddeaf8e95ec311b389f58378780e6f9b3"


def test_stored_hashes_are_sha256_or_peppered_hmac_sha256():
    assert keys.parse(FIXED_KEY).prefix == "mk_live_3fK9xQ2a"  # a well-formed key
    assert keys.hash_key(FIXED_KEY) == FIXED_SHA256
    assert keys.hash_key(FIXED_KEY, None) == FIXED_SHA256
    assert keys.hash_key(FIXED_KEY, b"pepper") == FIXED_HMAC_PEPPER


def test_hashing_with_and_without_pepper():
    key = keys.generate().plaintext
    plain = keys.hash_key(key)
    peppered = keys.hash_key(key, b"pepper")
    assert len(plain) == len(peppered) == 64
    assert plain != peppered != keys.hash_key(key, b"other")
    assert key not in plain + peppered


def test_redact_hides_keys_in_text():
    key = keys.generate().plaintext
    text = f"Authorization: Bearer {key} from 10.0.0.1"
    out = keys.redact(text)
    assert key not in out and key[:16] in out and "[REDACTED]" in out
