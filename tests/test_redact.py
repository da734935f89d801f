"""shards/redact.py: which parts of a URL are secrets, and every shape they come back in."""

from __future__ import annotations

import pytest

from shards.redact import MASK, SECRET_PARAMS, has_userinfo, redact_text, redact_url, redact_values

PRESIGNED = (
    "https://bucket.s3.amazonaws.com/photos.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z"
    "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=0123456789abcdef0123456789abcdef"
)


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        ("http://alice:TOKEN123@127.0.0.1:8080/photos.tar", "http://***@127.0.0.1:8080/photos.tar"),
        ("https://TOKEN123@host/x.tar", "https://***@host/x.tar"),
        ("s3://AKIAKEY:SeCrEt/Key@bucket/set", "s3://***@bucket/set"),
        ("https://host/a.tar?token=abcd1234&v=2", "https://host/a.tar?token=***&v=2"),
        ("https://host/a.tar?V=1&SIG=abcd1234", "https://host/a.tar?V=1&SIG=***"),
        ("https://host/a.tar#access_token=abcd1234", "https://host/a.tar#access_token=***"),
        ("https://host/a%20b.tar?x=a%2Fb&key=c%2Fd", "https://host/a%20b.tar?x=a%2Fb&key=***"),
        ("https://host/a.tar?token=", "https://host/a.tar?token="),  # nothing to hide
    ],
)
def test_redact_url(url: str, safe: str) -> None:
    assert redact_url(url) == safe


@pytest.mark.parametrize(
    "url", ["/data/photos.tar", "file:///data/x.tar", "s3://bucket/set", "https://host/a.tar?v=1&x=%7E", "relative/p"]
)
def test_nothing_secret_comes_back_unchanged(url: str) -> None:
    assert redact_url(url) == url
    assert not has_userinfo(url)


def test_presigned_url_keeps_everything_but_the_secrets() -> None:
    safe = redact_url(PRESIGNED)
    assert "0123456789abcdef" not in safe and "AKIAEXAMPLE" not in safe
    assert safe.startswith("https://bucket.s3.amazonaws.com/photos.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256")
    assert "X-Amz-Credential=***" in safe and "X-Amz-Signature=***" in safe and "X-Amz-Expires=3600" in safe


def test_has_userinfo() -> None:
    assert has_userinfo("http://alice:pw@host/x")
    assert has_userinfo("https://tok@host/x")
    assert not has_userinfo("https://host/x?token=abc")
    assert not has_userinfo("user@host:/path")  # scp-style, not a URL


def test_secret_params_are_lowercase() -> None:
    assert all(p == p.lower() for p in SECRET_PARAMS)
    assert {"x-amz-signature", "x-amz-credential", "x-amz-security-token", "signature", "sig", "token"} <= SECRET_PARAMS
    assert {"access_token", "key"} <= SECRET_PARAMS


def test_text_with_the_url_and_its_secret_alone() -> None:
    url = "http://alice:TOKEN123@host/photos.tar"
    text = f"GET {url} failed; retried with password TOKEN123"
    assert redact_text(text, url) == f"GET {redact_url(url)} failed; retried with password {MASK}"


def test_percent_encoded_password_is_hidden_in_every_form() -> None:
    url = "http://alice:p%40ss%2Fw0rd@host/x.tar"  # the password is p@ss/w0rd
    for shown in (url, "p%40ss%2Fw0rd", "p@ss/w0rd", "p%40ss/w0rd"):
        out = redact_text(f"error: {shown} (x)", url)
        assert "w0rd" not in out, out


def test_decoded_query_secret_in_an_exception() -> None:
    url = "https://host/a.tar?X-Amz-Credential=AKIAEXAMPLE%2F20260101%2Fus-east-1&X-Amz-Signature=ab%2Bcd%3D%3Dxyz"
    # urllib3 quotes only the path and query; botocore may decode them
    messages = [
        "Max retries exceeded with url: /a.tar?X-Amz-Credential=AKIAEXAMPLE%2F20260101%2Fus-east-1&X-Amz-Signature=ab",
        "credential AKIAEXAMPLE/20260101/us-east-1 refused, signature ab+cd==xyz",
    ]
    for m in messages:
        out = redact_text(m, url)
        assert "AKIAEXAMPLE" not in out and "ab+cd==xyz" not in out, out


def test_urls_found_in_a_text_without_being_named() -> None:
    text = (
        "ClientError: ('https://u:SeCrEt99@h/x?sig=QQQQ', 403) and /path?X-Amz-Signature=deadbeef&a=1; "
        "s3://AKIAKEY:SeCrEt/Key@bucket/set"
    )
    out = redact_text(text)
    for secret in ("SeCrEt99", "QQQQ", "deadbeef", "AKIAKEY", "SeCrEt/Key"):
        assert secret not in out, out
    assert "a=1" in out and "https://***@h/x?sig=***" in out


def test_ordinary_text_is_left_alone() -> None:
    text = "sample key n01440764_10026 in imagenet-train-000.tar: truncated JPEG; cache_key=abc123"
    assert redact_text(text) == text
    assert redact_text(text, "http://alice:ab@host/x") == text  # a two-letter password is not replaced alone


def test_redact_values_walks_a_record() -> None:
    cfg = {
        "shards": ["https://host/set/a-{000..001}.tar?token=abcd1234"],
        "data": None,
        "lr": 0.1,
        "nested": {"source": "http://alice:TOKEN123@host/p.tar", "pair": ("s3://b/k", 3)},
    }
    out = redact_values(cfg)
    assert out == {
        "shards": ["https://host/set/a-{000..001}.tar?token=***"],
        "data": None,
        "lr": 0.1,
        "nested": {"source": "http://***@host/p.tar", "pair": ("s3://b/k", 3)},
    }
    assert cfg["nested"]["source"].startswith("http://alice")  # the input is not changed
