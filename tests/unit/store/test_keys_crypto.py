"""Key generation/hashing, provider-key encryption and masking, risk settings validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from trex_serve.store.crypto import DecryptionError, SecretBox, derive_key, mask
from trex_serve.store.keys import generate_api_key, generate_owner_token, hash_key, key_prefix, new_id
from trex_serve.store.risk_settings import RiskSettings, ip_allowed, normalize_risk


def test_api_keys_are_random_hashed_and_prefixed():
    keys = {generate_api_key() for _ in range(200)}
    assert len(keys) == 200
    key = next(iter(keys))
    assert key.startswith("trex-") and len(key) == 45 and key[5:].isalnum()
    assert key_prefix(key) == key[:12]
    digest = hash_key(key)
    assert len(digest) == 64 and digest == hash_key(key) and digest != hash_key(key + "x")
    assert generate_owner_token().startswith("trexo-")
    assert new_id("acc").startswith("acc_") and len(new_id("acc")) == 20


def test_secret_box_any_string_and_rotation():
    box = SecretBox("correct horse battery staple")
    token = box.encrypt("sk-abc")
    assert "sk-abc" not in token and box.decrypt(token) == "sk-abc"
    assert len(derive_key("x")) == 44
    with pytest.raises(DecryptionError):
        SecretBox("other").decrypt(token)
    rotated = SecretBox("new, correct horse battery staple")
    assert rotated.decrypt(token) == "sk-abc"
    new_token = rotated.rotate_token(token)
    assert SecretBox("new").decrypt(new_token) == "sk-abc"
    with pytest.raises(ValueError):
        SecretBox(" , ")


@pytest.mark.parametrize(
    ("secret", "masked"),
    [
        ("sk-proj-abcdefghijklmnop1234", "sk-…1234"),
        ("sk-or-v1-0123456789abcdef", "sk-…cdef"),
        ("AIzaSyD0123456789abcdefXYZW", "…XYZW"),
        ("short", "…"),
        ("", "…"),
    ],
)
def test_mask_shows_at_most_last_four(secret, masked):
    assert mask(secret) == masked
    assert mask(None) is None


def test_risk_settings_validation():
    data = normalize_risk({"allowed_ips": ["203.0.113.9/24", "2001:db8::1/32"], "daily_spend_cap": 5,
                           "velocity": {"window_s": 60, "max_credits": 2.5}})
    assert data == {"allowed_ips": ["203.0.113.0/24", "2001:db8::/32"], "daily_spend_cap": 5.0,
                    "velocity": {"window_s": 60, "max_credits": 2.5}}
    assert normalize_risk(None) is None and normalize_risk({}) is None
    assert RiskSettings().alert_at == 0.8
    for bad in ({"allowed_ips": ["nope"]}, {"alert_at": 1.5}, {"daily_spend_cap": -1},
                {"max_output_tokens": 0}, {"velocity": {"window_s": 0, "max_credits": 1}}, {"extra": 1}):
        with pytest.raises(ValidationError):
            RiskSettings.model_validate(bad)


def test_ip_allowed():
    allowed = ["203.0.113.0/24", "2001:db8::/32"]
    assert ip_allowed("203.0.113.50", allowed)
    assert ip_allowed("::ffff:203.0.113.50", allowed)
    assert ip_allowed("2001:db8::5", allowed)
    assert not ip_allowed("198.51.100.1", allowed)
    assert not ip_allowed("garbage", allowed)
    assert ip_allowed("198.51.100.1", None)
    assert not ip_allowed("198.51.100.1", [])
